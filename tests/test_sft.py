"""SFT step: prompt-masked packed loss, exact gradient accumulation, sharded == 1 device, the
schedule and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import Transformer, get_model_config, init_params
from rlhf_jax.train import optim, sft, stage_io
from rlhf_jax.train.step import check_mesh_batch
from stage_steps import MESHES, assert_same_training, opt_config, run_train_steps, sgd

DROPOUT = 0.2   # the paper's SFT residual dropout: masks must not depend on the mesh either


def packed_batch(seed, batch=8, seq_len=32, vocab=512):
  """Rows of two packed demonstrations + padding; loss mask on each one's response part."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(batch, seq_len)).astype(np.int32)
  seg = np.zeros((batch, seq_len), np.int32)
  pos = np.zeros((batch, seq_len), np.int32)
  mask = np.zeros((batch, seq_len), np.float32)
  for row in range(batch):
    first = int(rng.integers(6, seq_len // 2))
    total = int(rng.integers(first + 6, seq_len + 1))
    for s, (a, b) in enumerate([(0, first), (first, total)], start=1):
      seg[row, a:b], pos[row, a:b] = s, np.arange(b - a)
      mask[row, a + (b - a) // 2:b] = 1.0      # the second half is the "response"
  tokens[seg == 0] = 0
  return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def test_loss_is_the_mean_over_response_tokens_only():
  cfg = get_model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  batch = packed_batch(0, batch=2)
  s, c, _ = jax.jit(sft.make_loss_fn(cfg))(params, batch, jax.random.key(0))
  logits, _ = jax.jit(Transformer(cfg).apply)({"params": params}, batch["tokens"],
                                              segment_ids=batch["segment_ids"])
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
  ref, n = 0.0, 0
  for b in range(2):
    for t in range(1, 32):
      if batch["loss_mask"][b, t]:
        ref -= logp[b, t - 1, batch["tokens"][b, t]]
        n += 1
  assert float(c) == n and n > 0
  np.testing.assert_allclose(float(s), ref, rtol=1e-5)
  # Prompt (masked) tokens are never targets: with the same logits, changing them all leaves the
  # loss unchanged.
  other = np.where(batch["loss_mask"] > 0, batch["tokens"], 5)
  s2, _ = losses.lm_loss(logits, other, batch["loss_mask"])
  np.testing.assert_allclose(float(s2), float(s), rtol=1e-6)


_PARAMS = {}


def _initial_params(cfg):
  """The same host parameters for every mesh (initialised once)."""
  if "p" not in _PARAMS:
    _PARAMS["p"] = jax.device_get(init_params(cfg, jax.random.key(0)))
  return _PARAMS["p"]


def _run_steps(mesh, steps=2, accum=1, batch_size=8, dropout=DROPOUT):
  """`steps` SFT steps with SGD (see stage_steps.sgd): (final host params, per-step metrics)."""
  cfg = get_model_config("tiny", dropout_resid=dropout)
  batches = [packed_batch(20 + i, batch=batch_size) for i in range(steps)]
  state, metrics = run_train_steps(cfg, "lm", sft.make_loss_fn(cfg), _initial_params(cfg), batches,
                                   mesh, accum, batch_size, tx=sgd())
  assert int(jax.device_get(state["step"])) == steps
  return jax.device_get(state["params"]), metrics


@pytest.fixture(scope="module")
def single_device_run():
  return _run_steps(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_sft_step_equals_single_device(shape, single_device_run):
  """Same loss, gradient norm and SGD updates on every mesh (dropout on: its masks must not depend
  on the mesh either)."""
  ref_params, ref_metrics = single_device_run
  params, metrics = _run_steps(sharding.make_mesh(shape))
  for m, r in zip(metrics, ref_metrics):
    assert m["count"] == r["count"]
  assert_same_training(params, metrics, ref_params, ref_metrics, _PARAMS["p"])


def test_the_comparison_rejects_a_gradient_off_by_a_tenth_of_a_percent(single_device_run):
  """Negative control for the sharded tests above (and RM's): with SGD a gradient scaled by
  0.999 scales the updates and the gradient norm by 0.999, and either one alone fails."""
  ref_params, ref_metrics = single_device_run
  init = _PARAMS["p"]
  scaled = jax.tree.map(lambda p, p0: p0 + 0.999 * (p - p0), ref_params, init)
  scaled_norms = [dict(m, grad_norm=m["grad_norm"] * 0.999) for m in ref_metrics]
  assert_same_training(ref_params, ref_metrics, ref_params, ref_metrics, init)
  with pytest.raises(AssertionError, match="grad_norm"):
    assert_same_training(ref_params, scaled_norms, ref_params, ref_metrics, init)
  with pytest.raises(AssertionError, match=r"\['embed'\]"):
    assert_same_training(scaled, ref_metrics, ref_params, ref_metrics, init)


def test_gradient_accumulation_is_exact():
  """2 micro-batches of 4 rows on a (2, 2, 2) mesh == the whole batch on one device: the loss is a
  mean over response TOKENS, and the micro-batches hold different numbers of them (43 and 56 in
  the first step). Dropout off: each micro-batch draws its own masks."""
  ref_params, ref_metrics = _run_steps(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                                       dropout=0.0)
  params, metrics = _run_steps(sharding.make_mesh((2, 2, 2)), accum=2, dropout=0.0)
  assert_same_training(params, metrics, ref_params, ref_metrics, _PARAMS["p"],
                       keys=("loss", "count"))


def test_cosine_schedule_decays_to_ten_percent():
  opt = opt_config(lr=1e-3)
  opt.warmup_steps = 10
  schedule = optim.make_schedule(opt, 100)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-6)
  assert float(schedule(50)) > float(schedule(80)) > 1e-4


def test_weight_decay_skips_norms_and_biases():
  cfg = get_model_config("tiny-gpt2")
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  mask = optim.decay_mask(params)
  assert mask["embed"] and mask["layers"]["attn"]["q"]["kernel"]
  assert not mask["layers"]["attn"]["q"]["bias"] and not mask["final_norm"]["scale"]


def _config(**overrides):
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "sft_config", os.path.join(os.path.dirname(__file__), "..", "configs", "sft.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.parametrize("field,value,message", [
    ("optimizer.lr", -1.0, "config.optimizer.lr must be a number > 0, got -1.0"),
    ("optimizer.lr", 0.0, "config.optimizer.lr must be a number > 0, got 0.0"),
    ("batch_size", 0, "config.batch_size must be an integer > 0, got 0"),
    ("batch_size", -4, "config.batch_size must be an integer > 0, got -4"),
    ("grad_accum_steps", 3, "config.grad_accum_steps (3) must divide config.batch_size (16)"),
    ("seq_len", 100000, "config.seq_len (100000) exceeds config.model.max_len (256)"),
    ("stage", "kto", "config.stage must be one of pretrain, sft, rm, ppo, dpo, got 'kto'"),
])
def test_bad_config_values_are_one_line_errors(field, value, message):
  with pytest.raises(UserError) as e:
    stage_io.validate_config(_config(**{field: value}))
  assert str(e.value) == message


def test_micro_batch_must_split_over_the_mesh():
  config = _config(batch_size=8, grad_accum_steps=2)
  with pytest.raises(UserError, match=r"= 4 must be a multiple of data x fsdp = 8"):
    check_mesh_batch(config, sharding.make_mesh((1, 8, 1)))
