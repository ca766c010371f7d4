"""The config files (configs/*.py): they load by path from any working directory without sys.path
edits, every preset passes its own stage's validation, each stage carries only the fields it reads
(the PPO config has no pretrain/SFT/RM batch or loop fields), one field is set per line, and
configs/eval.py is the pipeline's `config.eval`."""
import ast
import os
import subprocess
import sys

import ml_collections
import pytest

from rlhf_jax import config_files, evaluate, main
from rlhf_jax.errors import UserError
from rlhf_jax.train import loop, stage_io, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
PRESETS = ("tiny", "smollm2", "1.3b", "6.7b", "175b")
STAGE_FILES = ("sft", "rm", "collect", "dpo", "ppo_ptx")


def _config(name, preset="tiny"):
  return config_files.get_config(os.path.join(CONFIGS, f"{name}.py"), preset)


def _config_files():
  return sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py"))


def test_config_files_do_not_edit_sys_path():
  for name in _config_files():
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
      assert "sys.path" not in f.read(), name


def test_loading_a_config_leaves_sys_path_and_modules_alone():
  path, modules = list(sys.path), set(sys.modules)
  _config("ppo_ptx")
  assert sys.path == path
  new = set(sys.modules) - modules
  assert not {m for m in new if m.startswith(("configs", "rlhf_jax_config_", "config_"))}, new


def test_one_field_per_line():
  """No `c.a, c.b = 1, 2` or `c.a = c.b = 1` in the config files."""
  for name in _config_files():
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if not isinstance(node, ast.Assign):
        continue
      targets = [e for t in node.targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
      if any(isinstance(t, (ast.Attribute, ast.Subscript)) for t in targets):   # a config field
        assert len(targets) == 1, f"{name}:{node.lineno} sets {len(targets)} fields"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_its_stage_validation(preset):
  for name in STAGE_FILES:
    config = _config(name, preset)
    main.validate(config)
  ppo = _config("ppo_ptx", preset)
  for sub in ("pretrain", "sft", "collect", "rm", "dpo"):
    main.validate(ppo[sub])
  evaluate.validate(ppo)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_ppo_config_carries_only_fields_it_reads(preset):
  config = _config("ppo_ptx", preset)
  assert config.stage == "ppo"
  for field in step.FIELDS + loop.FIELDS:
    assert field not in config, field
    assert field in config.sft and field in config.rm, field    # the sub-configs keep theirs
  for name in ("sft", "rm"):
    for field in step.FIELDS + loop.FIELDS:
      assert field in _config(name, preset), (name, field)


def test_a_ppo_config_with_a_field_of_another_stage_is_refused():
  config = _config("ppo_ptx")
  config.batch_size = 8       # e.g. a config file written for the SFT stage's fields
  with pytest.raises(UserError, match=r"^config\.batch_size: the ppo stage does not read it"):
    stage_io.validate_config(config)


@pytest.mark.parametrize("preset", PRESETS)
def test_dpo_config_is_the_pipelines(preset):
  config = _config("dpo", preset)
  assert config.stage == "dpo" and config.beta == 0.1
  assert config.to_dict() == _config("ppo_ptx", preset).dpo.to_dict()


@pytest.mark.parametrize("preset", PRESETS)
def test_eval_config_is_the_pipelines(preset):
  config = config_files.get_config(os.path.join(CONFIGS, "eval.py"), preset)
  assert config.to_dict() == _config("ppo_ptx", preset).eval.to_dict()


def test_unknown_preset_is_a_value_error():
  with pytest.raises(ValueError, match="unknown config preset 'huge'"):
    _config("ppo_ptx", "huge")


def _cli(args, cwd, env):
  return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_loads_configs_by_absolute_path_from_another_directory(tmp_path):
  """Run from elsewhere with only the package importable (as after `pip install`): the config
  files still find each other; an unread field is refused by ml-collections, a bad one by the
  stage's validation; one line each, exit status 2, nothing written."""
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(ROOT, "rlhf_jax"), site / "rlhf_jax")    # `configs` is not importable
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(site))
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  ppo = f"--config={os.path.join(CONFIGS, 'ppo_ptx.py')}:smollm2"
  cases = [
      # the sub-configs holding the field are suggested, the config's own stage's first
      ([ppo, "--config.batch_size=8"], "error: --config.batch_size: no such field; did you mean "
                                       "--config.ppo.batch_size, "),
      ([ppo, "--config.num_steps=8"], "error: --config.num_steps: no such field; did you mean "
                                      "--config."),
      ([ppo, "--config.ppo.batch_size=0"], "error: config.ppo.batch_size must be an integer > 0, "
                                           "got 0"),
      ([f"--config={os.path.join(CONFIGS, 'collect.py')}", "--config.min_k=1"],
       "error: config.min_k must be an integer >= 2, got 1"),
  ]
  for args, message in cases:
    result = _cli([*args, f"--workdir={tmp_path / 'work'}"], str(cwd), env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(message) and len(result.stderr.splitlines()) == 1
  assert not (tmp_path / "work").exists() and not os.listdir(cwd)


def test_cli_loads_configs_from_the_repository_root(tmp_path):
  result = _cli(["--config=configs/ppo_ptx.py", "--config.eval_every=5",
                 f"--workdir={tmp_path / 'work'}"], ROOT, dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: --config.eval_every: no such field; did you "
                                          "mean --config.")
  assert result.stderr.strip().endswith(".eval_every?") and len(result.stderr.splitlines()) == 1
  assert not (tmp_path / "work").exists()


def test_config_files_load_a_sibling_by_path(tmp_path):
  (tmp_path / "base.py").write_text("VALUE = 7\n")
  (tmp_path / "top.py").write_text(
      "import ml_collections\n"
      "from rlhf_jax import config_files\n"
      "base = config_files.sibling(__file__, 'base')\n"
      "def get_config(preset='a'):\n"
      "  return ml_collections.ConfigDict({'value': base.VALUE, 'preset': preset})\n")
  config = config_files.get_config(str(tmp_path / "top.py"), "b")
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.to_dict() == {"value": 7, "preset": "b"}
  assert config_files.get_config(str(tmp_path / "top.py")).preset == "a"
