"""The memory planner: exact parameter bytes, fallbacks, the CLI, and a cross-check against XLA."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import multihost_worker as w
from rlhf_jax import config_files, plan, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import PRESET_NAMES, count_params, get_model_config


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rlhf_jax.plan", *args], capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("remat", [False, True])
def test_planner_within_25_percent_of_xla_memory_analysis(remat):
  """The planner's sft figure against XLA's own accounting of the same compiled train step."""
  cfg, tx = get_model_config("tiny", remat=remat), w.optimizer()
  mesh_shape, batch, seq = (1, 8, 1), 16, 128
  mesh = sharding.make_mesh(mesh_shape)
  shardings = w.state_shardings(cfg, tx, mesh)
  state = sharding.abstract_with_sharding(
      jax.eval_shape(lambda: w.init_state(cfg, tx, shardings)), shardings)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding(mesh))
  with sharding.activate(mesh):
    compiled = w.jit_step(cfg, tx, mesh, shardings).lower(
        state, {"tokens": tokens, "segment_ids": tokens}).compile()
  m = compiled.memory_analysis()
  xla = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
         + m.temp_size_in_bytes)
  ours = plan.plan(cfg, "sft", mesh_shape, batch, seq).total
  print(f"remat={remat}: planner {ours} B, XLA memory_analysis {xla} B, ratio {ours / xla:.3f}")
  assert 0.75 <= ours / xla <= 1.25


def test_parameter_and_stage_bytes_are_exact():
  cfg = get_model_config("tiny")
  n_lm, n_scalar = count_params(cfg, "lm"), count_params(cfg, "scalar")
  sft = plan.plan(cfg, "sft", (1, 8, 1), 32, 256)
  # Every tiny parameter has an 'embed' dimension, so fsdp=8 splits all of them.
  assert sft.params == sft.grads == n_lm * 4 // 8
  assert sft.opt == 2 * n_lm * 4 // 8 + 4                       # mu, nu + the int32 step count
  ppo = plan.plan(cfg, "ppo", (1, 8, 1), 32, 256)
  # The scalar head: a (d_model, 1) kernel split like the rest and a replicated (1,) bias.
  scalar = (n_scalar - 1) * 4 // 8 + 4
  assert ppo.frozen == n_lm * 4 // 8 + scalar                   # reference + reward model
  assert ppo.value == 4 * scalar + 4                            # value params, grads, mu, nu
  assert plan.plan(cfg, "sft", (1, 8, 1), 32, 256, remat=True).act < sft.act
  bf16 = plan.plan(cfg, "sft", (1, 8, 1), 32, 256, optimizer_dtype="bfloat16")
  assert bf16.opt == n_lm * 4 // 8 + 4
  big = plan.plan(get_model_config("175b"), "sft", (1, 64, 16), 128, 2048)
  assert big.params >= count_params(get_model_config("175b")) * 4 / 1024
  assert big.notes == ["vocab=50257 not divisible by tensor; replicated"]
  notes = plan.plan(get_model_config("smollm2-135m"), "sft", (1, 4, 2), 8, 128).notes
  assert "heads=9 not divisible by tensor; replicated" in notes


def test_cli_prints_every_preset():
  out = _cli()
  assert out.returncode == 0, out.stderr
  rows = [line.split() for line in out.stdout.splitlines()]
  for name in PRESET_NAMES:
    assert sum(1 for r in rows if r and r[0] == name) == len(plan.STAGES), name
  big = [r for r in rows if r and r[0] == "175b"]
  assert all(r[2] == "1,64,16" and r[3] == "1024" for r in big)
  print(out.stdout)


def test_cli_reads_a_stage_config(tmp_path):
  path = tmp_path / "stage.py"
  path.write_text(textwrap.dedent("""
      import ml_collections
      from rlhf_jax.models import preset

      def get_config(name="tiny"):
        config = ml_collections.ConfigDict()
        config.model = preset(name)
        config.mesh = ml_collections.ConfigDict({"shape": (2, -1, 2)})
        config.stage, config.batch_size, config.seq_len = "ppo", 16, 64
        return config
      """))
  out = _cli(f"--config={path}:tiny-gpt2", "--num_devices=16")
  assert out.returncode == 0, out.stderr
  row = [line.split() for line in out.stdout.splitlines()][2]
  assert row[1:5] == ["ppo", "2,4,2", "16", "16"]


@pytest.mark.parametrize("preset", ["tiny", "6.7b"])
def test_a_ppo_config_plans_its_episodes_and_minibatches(preset):
  """configs/ppo_ptx.py has no top-level batch_size/seq_len: the plan reads ppo.batch_size
  episodes of ppo.prompt_len + ppo.response_len tokens, minibatch ppo.batch_size / minibatches."""
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ppo_ptx.py")
  config = config_files.get_config(path, preset)
  p = config.ppo
  assert "batch_size" not in config and "seq_len" not in config
  [(_, _, stages, shape, batch, seq, _, minibatch)] = plan.requests(
      {"config": config, "num_devices": 8})
  assert stages == ("ppo",) and shape == (1, 8, 1)
  assert (batch, seq, minibatch) == (p.batch_size, p.prompt_len + p.response_len,
                                     p.batch_size // p.minibatches)
  # Flags win; the config's number of minibatches splits the batch the flags give.
  [run] = plan.requests({"config": config, "num_devices": 8, "batch_size": 128, "seq_len": 32})
  assert run[4:6] == (128, 32) and run[7] == 128 // p.minibatches
  [run] = plan.requests({"config": config, "num_devices": 8, "minibatch_size": 16})
  assert run[7] == 16
  if preset == "tiny":     # the command line: 64 episodes x (24 + 16) tokens, minibatch 64 / 4
    out = _cli(f"--config={path}:tiny", "--num_devices=8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2].split()[1:7] == ["ppo", "1,8,1", "8", "64", "x", "40"]
    out = _cli(f"--config={path}:tiny", "--num_devices=8", "--config.ppo.minibatches=16")
    assert out.stderr.startswith("error: minibatch_size: 4 must be a multiple of data x fsdp = 8")


@pytest.mark.parametrize("args, message", [
    (["--model=tiny", "--mesh=1,-1,3", "--num_devices=8"],
     "error: --mesh: (1, -1, 3) needs a multiple of 3 devices"),
    (["--model=nope"], "error: model preset 'nope' is unknown"),
])
def test_cli_user_errors_are_one_line(args, message):
  out = _cli(*args)
  assert out.returncode == 2
  assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_bad_batch_or_seq_len_is_a_user_error():
  cfg = get_model_config("tiny")
  with pytest.raises(UserError, match="batch_size: 12 must be a multiple of data x fsdp = 8"):
    plan.plan(cfg, "sft", (1, 8, 1), 12, 64)
  with pytest.raises(UserError, match="seq_len: must be in"):
    plan.plan(cfg, "sft", (1, 8, 1), 8, 100000)
