"""Non-finite guard: a step whose loss or gradient is NaN/Inf is not applied (parameters and
optimizer state bit-identical before and after), counted, logged, and training goes on exactly as
if that batch had not been there; N in a row stop the run with one line, the last checkpoint
intact."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.checkpoint import CheckpointManager
from rlhf_jax.models import ModelConfig, get_model_config
from rlhf_jax.train import loop, optim, sft, stage_io
from rlhf_jax.train.step import TrainStep, guard_nonfinite, jit_train_step, make_train_step

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
B, T = 8, 32


def _config(**overrides):
  spec = importlib.util.spec_from_file_location(
      "sft_config_nonfinite", os.path.join(ROOT, "configs", "sft.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model.num_layers = 1
  config.batch_size, config.eval_batch_size, config.seq_len = B, B, T
  config.optimizer.lr, config.optimizer.warmup_steps = 3e-3, 0
  config.log_every, config.eval_every = 2, 0
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  stage_io.validate_config(config)
  return config


def batch_at(i, poison=None):
  """Batch i of a fixed learnable stream (a repeated pattern, so the loss must fall); `poison`
  puts NaN or Inf into one loss-mask entry, the kind of value a broken batch carries."""
  rng = np.random.default_rng(i)
  start = rng.integers(0, 16, size=(B, 1))
  tokens = ((start + np.arange(T)[None]) % 16 + 3).astype(np.int32)     # counting mod 16
  batch = {"tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           "loss_mask": np.ones((B, T), np.float32)}
  if poison is not None:
    batch["loss_mask"][3, 7] = poison
  return batch


def _setup(config, num_steps):
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps)
  shardings = optim.state_shardings(cfg, "lm", tx, mesh)
  state = optim.create_state(optim.random_params(cfg, "lm", shardings["params"], 0), tx,
                             shardings)
  return cfg, mesh, tx, schedule, shardings, state


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
    np.testing.assert_array_equal(x, y)


def test_guard_selects_old_state_bit_for_bit():
  old = {"w": jnp.arange(4.0), "n": {"count": jnp.asarray(3, jnp.int32)}}
  new = {"w": jnp.asarray([1.0, jnp.nan, jnp.inf, -jnp.inf]), "n": {"count": jnp.asarray(4)}}
  for loss, norm, finite in [(1.0, 2.0, True), (jnp.nan, 2.0, False), (1.0, jnp.inf, False),
                             (-jnp.inf, 1.0, False), (1.0, jnp.nan, False)]:
    out, ok = jax.jit(lambda o, n, l, g: guard_nonfinite(o, lambda: n, l, g))(
        old, new, jnp.float32(loss), jnp.float32(norm))
    assert bool(ok) == finite
    _assert_equal(out, new if finite else old)


@pytest.fixture(scope="module")
def steps():
  """The real SFT train step (jitted, sharded, state donated) on 8 devices."""
  config = _config()
  cfg, mesh, tx, schedule, shardings, state = _setup(config, 20)
  step = jit_train_step(make_train_step(sft.make_loss_fn(cfg), tx, schedule, 1, mesh),
                        shardings, batch_at(0), mesh)

  def run(state, batches, first=0):
    out = []
    with sharding.activate(mesh):
      for i, b in enumerate(batches):
        state, m = step(state, sharding.global_batch(b, mesh, B), jax.random.key(first + i))
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, out

  fresh = lambda: optim.create_state(_host(state["params"]), tx, shardings)
  return run, fresh


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_poisoned_batch_is_skipped_and_training_goes_on(steps, poison):
  run, fresh = steps
  state, _ = run(fresh(), [batch_at(i) for i in range(3)])
  before = _host(state)
  state, m = run(state, [batch_at(3, poison)], first=3)
  assert m[0]["nonfinite"] == 1.0 and not np.isfinite(m[0]["loss"])
  after = _host(state)
  _assert_equal(after["params"], before["params"])          # not applied ...
  _assert_equal(after["opt_state"], before["opt_state"])    # ... optimizer moments and count too
  assert int(after["step"]) == int(before["step"]) + 1      # the data / RNG position moves on
  state, m = run(state, [batch_at(i) for i in range(4, 16)], first=4)
  assert sum(x["nonfinite"] for x in m) == 0
  losses = [x["loss"] for x in m]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  # Training continued exactly as if the batch had never been there (no dropout in tiny).
  clean, m_clean = run(fresh(), [batch_at(i) for i in range(3)] +
                       [batch_at(i) for i in range(4, 16)])
  _assert_equal(state["params"], clean["params"])
  assert [x["lr"] for x in m_clean[3:]] == [x["lr"] for x in m]


class _Stream:
  """A resumable iterator over batch_at(i), poisoned at the 0-based indices `bad`."""

  def __init__(self, bad=()):
    self.i, self.bad = 0, set(bad)

  def __next__(self):
    b = batch_at(self.i, np.nan if self.i in self.bad else None)
    self.i += 1
    return b

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _run_loop(workdir, config, num_steps, bad, on_eval=None):
  cfg, mesh, tx, schedule, _, state = _setup(config, num_steps)
  task = loop.Task(name="sft", step=TrainStep(sft.make_loss_fn(cfg), tx, schedule, 1, mesh, B),
                   train_batches=lambda: _Stream(bad), rng=jax.random.key(config.seed + 1),
                   record=loop.config_record(config), evaluate=lambda p: {})
  return loop.run_loop(task, state, loop.Cadence.from_config(config, num_steps), str(workdir),
                       mesh, on_eval=on_eval)


def _records(workdir):
  with open(os.path.join(workdir, "sft", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_loop_counts_logs_and_continues(tmp_path):
  config = _config(checkpoint_every=4)
  state, _, history = _run_loop(tmp_path, config, 8, bad={4})
  records = _records(tmp_path)
  assert [r for r in records if r["kind"] == "nonfinite"] == [
      {"kind": "nonfinite", "step": 5, "consecutive": 1.0, "total": 1.0}]
  train = {r["step"]: r for r in records if r["kind"] == "train"}
  assert [train[s]["nonfinite"] for s in (2, 4, 6, 8)] == [0.0, 0.0, 1.0, 0.0]
  assert np.isfinite(train[6]["loss"])          # the log averages the applied steps only
  assert int(state["step"]) == 8
  meta = CheckpointManager(str(tmp_path / "sft" / "checkpoints")).read_meta()
  assert meta["nonfinite"] == {"total": 1, "consecutive": 0}


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(tmp_path):
  config = _config(checkpoint_every=4, max_nonfinite_steps=3, eval_every=4)
  seen = {}
  with pytest.raises(loop.NonFiniteError) as e:
    _run_loop(tmp_path, config, 12, bad={5, 6, 7, 8},
              on_eval=lambda step, params, _: seen.setdefault(step, _host(params)))
  ckpt_dir = tmp_path / "sft" / "checkpoints"
  assert str(e.value) == (
      "step 8: the loss or gradient was not finite for 3 consecutive steps "
      f"(config.max_nonfinite_steps = 3); stopped without saving; the last good checkpoint is "
      f"{ckpt_dir / '4'}")
  mngr = CheckpointManager(str(ckpt_dir))
  assert mngr.all_steps() == [4]                  # step 8 (a save step) was not saved
  # The checkpoint holds the parameters the run had at step 4 (seen by the evaluation there).
  _, _, _, _, shardings, state = _setup(config, 12)
  restored, meta = mngr.restore(sharding.abstract_with_sharding(state, shardings))
  assert mngr.read_data() == {"i": 4} and int(restored["step"]) == 4
  _assert_equal(restored["params"], seen[4])
  # ... and the skipped steps left the parameters as they were after step 5.
  assert sorted(seen) == [0, 4, 8]
  records = _records(tmp_path)
  assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [6, 7, 8]
