"""The memory planner: exact parameter bytes, one job per config (the PPO stage reads PPO's batch),
the CLI, and the estimate against XLA's own figure for the same compiled train step."""
import json
import os
import subprocess
import sys

import pytest

from rlhf_jax import config_files, plan, plan_compile, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import count_params, get_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, preset="tiny"):
  return config_files.get_config(os.path.join(ROOT, "configs", f"{name}.py"), preset)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rlhf_jax.plan", *args], capture_output=True,
                        text=True, timeout=300, cwd=ROOT)


def _result(stdout):
  last = stdout.strip().splitlines()[-1]
  assert last.startswith("RESULT "), stdout
  return json.loads(last[len("RESULT "):])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_estimate_within_25_percent_of_the_compiled_sft_step(remat):
  """The sft estimate against XLA's memory_analysis of the step training runs (CPU here)."""
  config = _config("sft")
  config.model.remat = remat
  # The estimate models the layer scan every preset but tiny trains with; tiny's unrolled layers
  # (a CPU speed option) compile to more separate temporaries (0.67 of this sum at remat none).
  config.model.unroll_layers = False
  config.batch_size, config.seq_len = 16, 128
  mesh = sharding.make_mesh((1, 8, 1))
  compiled = plan_compile.compile_stage("sft", config, mesh, platform="cpu")["compiled_bytes"]
  ours = plan.estimate("sft", config, (1, 8, 1)).total
  print(f"remat={remat}: estimate {ours} B, compiled {compiled} B, ratio {ours / compiled:.3f}")
  assert 0.75 <= ours / compiled <= 1.25


def test_parameter_and_stage_bytes_are_exact():
  config = _config("ppo_ptx")
  cfg = get_model_config("tiny")
  n_lm, n_scalar = count_params(cfg, "lm"), count_params(cfg, "scalar")
  sft = plan.estimate("sft", config.sft, (1, 8, 1))
  # Every tiny parameter has an 'embed' dimension, so fsdp=8 splits all of them.
  assert sft.params == sft.grads == n_lm * 4 // 8
  assert sft.opt == 2 * n_lm * 4 // 8 + 4                       # mu, nu + the int32 step count
  ppo = plan.estimate("ppo", config, (1, 8, 1))
  # The scalar head: a (d_model, 1) kernel split like the rest and a replicated (1,) bias.
  scalar = (n_scalar - 1) * 4 // 8 + 4
  assert ppo.frozen == n_lm * 4 // 8 + scalar                   # reference + reward, float32
  assert ppo.value == 4 * scalar + 4                            # value params, grads, mu, nu
  assert ppo.ema == 0 and ppo.grads == 2 * ppo.params           # tiny: no EMA; PPO + ptx grads
  config.ppo.frozen_dtype, config.ppo.ema_decay = "bfloat16", 0.99
  ppo = plan.estimate("ppo", config, (1, 8, 1))
  assert ppo.frozen == (n_lm * 4 // 8 + scalar) // 2 and ppo.ema == ppo.params
  full = _config("sft")
  full.model.remat = "full"
  assert plan.estimate("sft", full, (1, 8, 1)).act < plan.estimate("sft", _config("sft"),
                                                                   (1, 8, 1)).act


def test_sharding_fallbacks_are_notes():
  smol = _config("sft", "smollm2")
  smol.batch_size = 8
  assert "heads=9 not divisible by tensor; replicated" in plan.estimate("sft", smol,
                                                                        (1, 4, 2)).notes


def test_a_ppo_config_plans_its_pipeline_with_ppos_own_batch():
  """configs/ppo_ptx.py:6.7b has no top-level batch: its ppo stage is 512 episodes of 256 + 256
  tokens, minibatches of 64, 8 pretraining rows of 2048 per episode; sft and rm are the
  pipeline's sub-configs (paper: 32 x 2048 and 64 prompts x K x 1024)."""
  config = plan.paper_config("6.7b")
  assert "batch_size" not in config and "seq_len" not in config
  stages = plan.stage_configs(config)
  assert list(stages) == ["sft", "rm", "ppo"]
  assert plan_compile.batch_rows("ppo", config) == [64, 512, 64]
  assert plan_compile.choose_mesh("ppo", config, 256) == (1, 64, 4)
  assert plan_compile.choose_mesh("sft", stages["sft"], 256) == (1, 32, 8)
  one = plan.estimate("ppo", config, (1, 64, 4), "tpu")
  assert one.shape == "512 x 256+256, mb 64, ptx 8/ep x 2048"
  config.ppo.batch_size = 1024       # twice the episodes: more rollout, same minibatch work
  two = plan.estimate("ppo", config, (1, 64, 4), "tpu")
  assert two.total >= one.total


def test_cli_one_answer_per_job():
  """--model=X is --config=configs/ppo_ptx.py:X: the same numbers, and the all-presets table
  has the same row for it."""
  by_model = _result(_cli("--model=6.7b").stdout)
  by_config = _result(_cli("--config=configs/ppo_ptx.py:6.7b", "--num_devices=256").stdout)
  assert by_model["stages"] == by_config["stages"]
  assert set(by_model["stages"]) == {"sft", "rm", "ppo_ptx"}
  ppo = by_model["stages"]["ppo_ptx"]
  assert ppo["batch"].startswith("512 x 256+256") and ppo["mesh"] == [1, 64, 4]
  assert ppo["compiled_bytes"] is None and ppo["fits"] is None        # no --topology
  out = _cli()
  assert out.returncode == 0, out.stderr
  every = _result(out.stdout)["jobs"]
  assert [j["job"] for j in every] == list(plan.CONFIG_PRESETS)
  assert every[plan.CONFIG_PRESETS.index("6.7b")]["stages"] == by_model["stages"]
  print(out.stdout)


def test_cli_reads_a_single_stage_config_and_overrides():
  out = _cli("--config=configs/sft.py:tiny", "--num_devices=8", "--config.batch_size=32")
  assert out.returncode == 0, out.stderr
  stages = _result(out.stdout)["stages"]
  assert list(stages) == ["sft"] and stages["sft"]["batch"] == "32 x 128"


@pytest.mark.parametrize("args, message", [
    (["--model=tiny", "--mesh=1,-1,3", "--num_devices=8"],
     "error: --mesh: (1, -1, 3) needs a multiple of 3 devices"),
    (["--model=nope"], "error: --model: expected a config preset"),
    (["--config=configs/ppo_ptx.py:tiny", "--mesh=1,8,1", "--num_devices=8",
      "--config.ppo.minibatches=16"],
     "error: ppo batch rows per step: 4 must be a multiple of data x fsdp = 8"),
    (["--model=tiny", "--topology=v9z:1x1"], "error: --topology: cannot build TPU topology"),
])
def test_cli_user_errors_are_one_line(args, message):
  out = _cli(*args)
  assert out.returncode == 2, out.stderr
  assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_bad_mesh_for_the_batch_is_a_user_error():
  config = _config("sft")
  config.batch_size = 12
  with pytest.raises(UserError, match="12 must be a multiple of data x fsdp = 8"):
    plan.estimate("sft", config, (1, 8, 1))
