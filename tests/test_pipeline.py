"""The pipeline: each stage's config, and its skip / re-run logic on the real stages."""
import contextlib
import io
import os
import shutil
import time

import pytest

from rlhf_jax import pipeline
from rlhf_jax.errors import UserError
from rlhf_jax.train import ppo as ppo_lib


def _config():
  import importlib.util
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("ppo_ptx_config",
                                                os.path.join(here, "configs", "ppo_ptx.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


ALL = ["pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "ppo_oracle", "dpo", "eval"]


# ----------------------------------------------------------------------------- the real stages

# Every stage's writer (sft.run for pretrain and sft, collect.run, rm.run, ppo.run, evaluate.run);
# ppo_ptx and ppo_oracle are ppo.run under other names (test_stage_configs_... checks the names),
# left out because each costs this test more than ppo does (ppo_ptx compiles the pretraining term;
# ppo_oracle's steps were compiled again even with a warm compilation cache).
REAL = ["pretrain", "sft", "collect", "rm", "ppo", "eval"]


def _tiny(config, data_dir):
  """The pipeline of REAL: a 1-layer model, a few steps per stage, on the shared offline data."""
  config.data.dir = data_dir
  config.data.prefetch = 0
  config.model.num_layers = config.rm.model.num_layers = 1   # (rm has its own model section)
  config.ppo.ptx_coef = 0.0
  config.oracle_run = False
  config.dpo_run = False     # (tests/test_dpo.py runs the stage)
  for stage in ("pretrain", "sft", "rm"):   # (no periodic evaluation: fewer functions to compile)
    c = config[stage]
    c.num_steps = c.checkpoint_every = c.log_every = 2
    c.eval_every, c.eval_batches, c.batch_size, c.eval_batch_size = 0, 1, 8, 8
  # SFT long enough that the policy's samples differ in gold score (the collect stage fails when
  # every prompt's K responses tie)
  config.sft.num_steps = config.sft.checkpoint_every = 40
  config.sft.log_every = 20
  config.rm.norm_examples = 8
  c = config.collect
  c.num_train_prompts, c.num_eval_prompts, c.batch_size = 16, 8, 8
  c.min_k = c.max_k = 4
  c.max_new_tokens = 8
  p = config.ppo
  p.num_iterations, p.batch_size, p.minibatches, p.checkpoint_every = 1, 8, 1, 1
  p.response_len = 8
  e = config.eval
  e.num_prompts, e.samples_per_prompt, e.batch_size, e.max_new_tokens = 8, 1, 8, 8
  e.pretrain_batches, e.best_of = 0, ()     # (the parts of evaluation this test does not need)
  e.probe_prompts, e.probe_new_tokens, e.num_examples = 8, 2, 1
  assert pipeline.stages_of(config) == REAL
  return config


def _run(config, workdir):
  """pipeline.run, from what it prints: (the stages it ran, those it skipped as up to date)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    pipeline.run(config, workdir)
  lines = buf.getvalue().splitlines()
  ran = [l.split()[2] for l in lines if l.startswith("pipeline: running ")]
  skipped = [l.split()[1] for l in lines if l.startswith("pipeline: ") and "is up to date" in l]
  return ran, skipped


def _files(workdir):
  """{stage: {path: (size, mtime)} of every file the stage wrote} (eval: results.*, plots/)."""
  out = {}
  for stage in REAL:
    files = {}
    for top in pipeline.stage_outputs(workdir, stage):
      walk = os.walk(top) if os.path.isdir(top) else [("", [], [top] if os.path.exists(top) else [])]
      for dirpath, _, names in walk:
        for name in names:
          st = os.stat(os.path.join(dirpath, name))
          files[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    out[stage] = files
  return out


@pytest.mark.slow   # ~80 s with a cold compilation cache, ~30 s warm (2 cores shared with others)
def test_real_stages_run_then_skip_by_their_markers_then_rerun_from_a_deleted_stage(
    tmp_path, offline_data_dir):
  """The real stages (a few steps each) write the markers the pipeline skips by: a second run
  runs and writes nothing; after deleting rm/ exactly rm and the stages after it run again, and
  the others' files stay as they were."""
  config, workdir = _tiny(_config(), offline_data_dir), str(tmp_path)
  assert _run(config, workdir) == (REAL, [])
  for stage in REAL:
    assert os.path.exists(pipeline.marker(workdir, stage)), stage
  before = _files(workdir)
  assert _run(config, workdir) == ([], REAL)
  assert _files(workdir) == before
  shutil.rmtree(os.path.join(workdir, "rm"))
  assert _run(config, workdir) == (["rm", "ppo", "eval"], ["pretrain", "sft", "collect"])
  after = _files(workdir)
  for stage in ("pretrain", "sft", "collect"):
    assert after[stage] == before[stage], stage
  for stage in ("rm", "ppo", "eval"):
    marker = pipeline.marker(workdir, stage)
    assert after[stage][marker][1] > before[stage][marker][1], stage


# ----------------------------------------------------------------------------- the rules

@pytest.fixture
def fake_stages(monkeypatch):
  """run_stage replaced by one that only writes the stage's marker (and results.md)."""
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


def test_a_deleted_stage_reruns_only_the_stages_that_read_it(tmp_path, fake_stages):
  """DEPENDS on every stage of the default pipeline: ppo_ptx and ppo_oracle do not read ppo, dpo
  reads no reward model; a new DPO model re-runs the evaluation."""
  config = _config()
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ALL
  fake_stages.clear()
  shutil.rmtree(tmp_path / "ppo")
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ["ppo", "eval"]
  fake_stages.clear()
  shutil.rmtree(tmp_path / "rm")
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ["rm", "ppo", "ppo_ptx", "ppo_oracle", "eval"]
  fake_stages.clear()
  shutil.rmtree(tmp_path / "dpo")
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ["dpo", "eval"]
  fake_stages.clear()
  shutil.rmtree(tmp_path / "collect")
  pipeline.run(config, str(tmp_path))
  assert fake_stages == ["collect", "rm", "ppo", "ppo_ptx", "ppo_oracle", "dpo", "eval"]


def test_stage_configs_share_the_top_level_fields(tmp_path):
  config = _config()
  config.seed = 3
  config.data.task_seed = 7
  config.model.num_layers = 3
  sft = pipeline.stage_config(config, "sft", str(tmp_path))
  rm = pipeline.stage_config(config, "rm", str(tmp_path))
  ppo = pipeline.stage_config(config, "ppo", str(tmp_path))
  oracle = pipeline.stage_config(config, "ppo_oracle", str(tmp_path))
  dpo = pipeline.stage_config(config, "dpo", str(tmp_path))
  assert sft.seed == rm.seed == 3 and sft.data.task_seed == rm.data.task_seed == 7
  assert sft.model.num_layers == 3 and sft.stage == "sft"
  assert rm.data.comparisons_dir == os.path.join(str(tmp_path), "collect")
  assert dpo.data.comparisons_dir == rm.data.comparisons_dir and dpo.stage == "dpo"
  assert dpo.model.num_layers == 3 and dpo.seed == 3 and dpo.beta == config.dpo.beta
  assert ppo.ppo.ptx_coef == 0 and config.ppo.ptx_coef > 0
  assert oracle.reward_model == "gold" and oracle.ppo.ptx_coef == config.ppo.ptx_coef
  for stage in ("ppo", "ppo_ptx", "ppo_oracle"):    # where ppo.run writes is the stage's folder
    assert ppo_lib.stage_name(pipeline.stage_config(config, stage, str(tmp_path))) == stage
  assert pipeline.stages_of(config) == ALL
  config.oracle_run = False
  assert "ppo_oracle" not in pipeline.stages_of(config)
  config.dpo_run = False
  assert "dpo" not in pipeline.stages_of(config)
  config.ppo.ptx_coef = 0.0
  assert "ppo_ptx" not in pipeline.stages_of(config)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(UserError, match="--workdir"):
    pipeline.run(_config(), str(blocker / "sub"))
