"""The oracle run (PPO against the offline task's gold labeler, `config.reward_model='gold'`) on
2 processes x 4 CPU devices equals it on 1 process x 8 devices (gloo collectives in both, as in
tests/test_multihost_pipeline.py): the gold reward is a host callback, which on several processes
runs per device on that device's own rows (`ppo_gold.gold_score_fn`); the logged gold score covers
every process's rows.
"""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import kill_resume as kr
from fake_devices import xla_flags
from test_multihost_pipeline import XLA   # LLVM at -O0, as there
from rlhf_jax.models import ModelConfig, init_params

ROOT = kr.ROOT
ONE_PROCESS = os.path.join(ROOT, "tests", "one_process_gloo.py")
SIZES = {"ptx": 50, "sft": 50, "comparisons": 20, "prompts": 64, "validation": 16}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Offline data and a random 'SFT' and value model (as tests/test_ppo.py's ppo_inputs)."""
  from rlhf_jax.convert import save_model
  from rlhf_jax.data import prepare
  from rlhf_jax.data.offline_dataset import OfflineSizes
  root = tmp_path_factory.mktemp("oracle_inputs")
  paths = prepare.prepare_offline(str(root / "data"), sizes=OfflineSizes(**SIZES))
  cfg = ModelConfig(vocab_size=512, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                    head_dim=16, d_ff=64, max_len=128)
  keys = jax.random.split(jax.random.key(0), 2)
  for name, head, key in (("sft", "lm", keys[0]), ("rm", "scalar", keys[1])):
    save_model(str(root / name), cfg, jax.device_get(init_params(cfg, key, head)),
               fmt="rlhf_jax", head=head, tokenizer_dir=paths["tokenizer"])
  return root


def _args(root, workdir):
  over = {"pipeline": False, "init_from": root / "sft", "reward_model": "gold",
          "value_from": root / "rm", "data.dir": root / "data", "model.num_layers": 1,
          "model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 2,
          "model.head_dim": 16, "model.d_ff": 64, "model.max_len": 128, "mesh.shape": "1,8,1",
          "ppo.num_iterations": 2, "ppo.batch_size": 16, "ppo.minibatches": 2,
          "ppo.prompt_len": 32, "ppo.response_len": 8, "ppo.ptx_seq_len": 32,
          "ppo.ptx_coef": 0.0, "ppo.log_every": 1, "ppo.gold_reward_scale": 1.0,
          "data.shards": 2, **{f"data.task.{k}": v for k, v in SIZES.items()}}
  return ["--config=configs/ppo_ptx.py", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in over.items()]


def _start(cmd, env, log):
  with open(log, "w") as f:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_oracle_run_on_two_processes_equals_one(inputs, tmp_path):
  from test_multihost import _free_port
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  procs, logs = [], []
  port = _free_port()
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS=xla_flags(4, XLA), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_ENABLE_COMPILATION_CACHE="false")   # (as in test_multihost_pipeline.Run)
    logs.append(f"{two}.{i}.log")
    procs.append(_start([sys.executable, "-m", "rlhf_jax.main",
                         f"--coordinator_address=localhost:{port}", "--num_processes=2",
                         f"--process_id={i}"] + _args(inputs, two), env, logs[-1]))
  env = dict(os.environ, XLA_FLAGS=xla_flags(8, XLA), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  logs.append(f"{one}.log")
  procs.append(_start([sys.executable, ONE_PROCESS, f"--port={_free_port()}"]
                      + _args(inputs, one), env, logs[-1]))
  deadline = time.monotonic() + 600
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, open(log).read()[-4000:]
  kr.assert_same_params(os.path.join(two, "ppo_oracle", "model"),
                        os.path.join(one, "ppo_oracle", "model"))
  rows = {}
  for name, workdir in (("two", two), ("one", one)):
    with open(os.path.join(workdir, "ppo_oracle", "metrics.jsonl")) as f:
      rows[name] = [{k: v for k, v in json.loads(line).items()
                     if not k.endswith(("per_s", "seconds"))} for line in f]
  assert rows["two"] == rows["one"] and len(rows["two"]) == 2
  for row in rows["two"]:     # the iteration's reward is the host's gold score of all 16 rows
    assert row["reward"] == pytest.approx(row["gold_score"], abs=1e-6)
    assert np.isfinite(row["gold_score"])
