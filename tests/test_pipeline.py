"""The pipeline's skip / re-run logic, with stand-in stages that only write their markers."""
import os
import time

import pytest

from rlhf_jax import pipeline
from rlhf_jax.errors import UserError


def _config():
  import importlib.util
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("ppo_ptx_config",
                                                os.path.join(here, "configs", "ppo_ptx.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


@pytest.fixture
def fake_stages(monkeypatch):
  ran = []

  def run_stage(stage, config, workdir):
    ran.append(stage)
    time.sleep(0.01)   # distinct marker mtimes
    path = pipeline.marker(workdir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write("{}")
    if stage == "eval":
      with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write("table\n")
      return {}
    return path
  monkeypatch.setattr(pipeline, "run_stage", run_stage)
  return ran


ALL = ["pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "ppo_oracle", "eval"]


def test_runs_in_order_then_skips_then_reruns_from_a_deleted_stage(tmp_path, fake_stages):
  import shutil
  config = _config()
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ALL
  fake_stages.clear()
  pipeline.run(config, str(tmp_path))
  assert fake_stages == []
  shutil.rmtree(tmp_path / "rm")
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ["rm", "ppo", "ppo_ptx", "ppo_oracle", "eval"]
  fake_stages.clear()
  shutil.rmtree(tmp_path / "ppo")           # ppo_ptx does not depend on ppo
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ["ppo", "eval"]


def test_stage_configs_share_the_top_level_fields(tmp_path):
  config = _config()
  config.seed = 3
  config.data.task_seed = 7
  config.model.num_layers = 3
  sft = pipeline.stage_config(config, "sft", str(tmp_path))
  rm = pipeline.stage_config(config, "rm", str(tmp_path))
  ppo = pipeline.stage_config(config, "ppo", str(tmp_path))
  oracle = pipeline.stage_config(config, "ppo_oracle", str(tmp_path))
  assert sft.seed == rm.seed == 3 and sft.data.task_seed == rm.data.task_seed == 7
  assert sft.model.num_layers == 3 and sft.stage == "sft"
  assert rm.data.comparisons_dir == os.path.join(str(tmp_path), "collect")
  assert ppo.ppo.ptx_coef == 0 and config.ppo.ptx_coef > 0
  assert oracle.reward_model == "gold" and oracle.ppo.ptx_coef == config.ppo.ptx_coef
  assert pipeline.stages_of(config) == ALL
  config.oracle_run = False
  assert "ppo_oracle" not in pipeline.stages_of(config)
  config.ppo.ptx_coef = 0.0
  assert "ppo_ptx" not in pipeline.stages_of(config)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(UserError, match="--workdir"):
    pipeline.run(_config(), str(blocker / "sub"))
