"""Reward-model step: one forward per response == naive pairwise forwards (loss AND parameter
gradients); sharded steps == the 1-device step; K < 2 and shape mismatches are user errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import Transformer, get_model_config, init_params
from rlhf_jax.train import rm, stage_io
from stage_steps import MESHES, assert_same_training, run_train_steps, sgd


def comparison_batch(seed, batch=8, k_max=5, seq_len=16, vocab=512):
  """Random (B, K_max, T) comparisons like comparison_loader's: K in 2..k_max, ties, padding."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, k_max, seq_len), np.int32)
  seg = np.zeros_like(tokens)
  pos = np.zeros_like(tokens)
  last = np.zeros((batch, k_max), np.int32)
  ranks = np.full((batch, k_max), -1, np.int32)
  valid = np.zeros((batch, k_max), np.float32)
  for b in range(batch):
    k = int(rng.integers(2, k_max + 1))
    prompt = rng.integers(3, vocab, size=int(rng.integers(2, 6)))
    r = rng.integers(0, k, size=k)
    if len(set(r.tolist())) < 2:
      r[0], r[1] = 0, 1
    ranks[b, :k], valid[b, :k] = r, 1.0
    for j in range(k):
      n = int(rng.integers(len(prompt) + 1, seq_len + 1))
      row = np.concatenate([prompt, rng.integers(3, vocab, size=n - len(prompt))])
      tokens[b, j, :n], seg[b, j, :n], pos[b, j, :n] = row, 1, np.arange(n)
      last[b, j] = n - 1
  return {"tokens": tokens, "segment_ids": seg, "positions": pos, "last_index": last,
          "ranks": ranks, "response_valid": valid}


def naive_pairwise_loss_and_grads(cfg, params, batch):
  """The chosen/rejected way: every pair (w, l) forwards its two responses (its own model call);
  loss = mean over prompts of -1/C(K,2) sum log sigmoid(r_w - r_l), gradients summed pair by pair.
  """
  model = Transformer(cfg, head="scalar")

  @jax.jit
  @jax.value_and_grad
  def pair_loss(p, tokens, seg, pos, last, weight):
    values, _ = model.apply({"params": p}, tokens, segment_ids=seg, positions=pos)
    return -jax.nn.log_sigmoid(values[0, last[0]] - values[1, last[1]]) * weight

  prompts = batch["tokens"].shape[0]
  total, grads = 0.0, jax.tree.map(np.zeros_like, params)
  for b in range(prompts):
    k = int(batch["response_valid"][b].sum())
    for w, l in itertools.permutations(range(k), 2):
      if batch["ranks"][b, w] >= batch["ranks"][b, l]:
        continue
      idx = np.asarray([w, l])
      loss, g = pair_loss(params, batch["tokens"][b, idx], batch["segment_ids"][b, idx],
                          batch["positions"][b, idx], batch["last_index"][b, idx],
                          1.0 / (k * (k - 1) / 2) / prompts)
      total += float(loss)
      grads = jax.tree.map(lambda a, x: a + np.asarray(x, np.float64), grads, g)
  return total, grads


def test_one_forward_per_response_equals_naive_pairwise():
  cfg = get_model_config("tiny")
  params = init_params(cfg, jax.random.key(0), head="scalar")
  batch = comparison_batch(1, batch=2, k_max=4, seq_len=12)
  # Prompt 0: K = 4 with a tie; prompt 1: K = 3 (one padding response).
  batch["ranks"][0], batch["response_valid"][0] = [0, 1, 1, 2], 1.0
  batch["ranks"][1], batch["response_valid"][1] = [1, 0, 2, -1], [1.0, 1.0, 1.0, 0.0]
  loss_fn = rm.make_loss_fn(cfg)

  def ours(p):
    s, c, _ = loss_fn(p, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    return s / c

  loss, grads = jax.jit(jax.value_and_grad(ours))(params)
  ref_loss, ref_grads = naive_pairwise_loss_and_grads(cfg, params, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


_PARAMS = {}


def _initial_params(cfg):
  """The same host parameters for every mesh (initialised once)."""
  if "p" not in _PARAMS:
    _PARAMS["p"] = jax.device_get(init_params(cfg, jax.random.key(0), head="scalar"))
  return _PARAMS["p"]


def _run_steps(mesh, steps=2, accum=1, batch_size=8):
  """`steps` RM steps with SGD (see stage_steps.sgd): (final host params, per-step metrics)."""
  cfg = get_model_config("tiny")
  batches = [comparison_batch(10 + i, batch=batch_size) for i in range(steps)]
  state, metrics = run_train_steps(cfg, "scalar", rm.make_loss_fn(cfg), _initial_params(cfg),
                                   batches, mesh, accum, batch_size, tx=sgd())
  return jax.device_get(state["params"]), metrics


@pytest.fixture(scope="module")
def single_device_run():
  return _run_steps(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_rm_step_equals_single_device(shape, single_device_run):
  """Same loss, pair accuracy, gradient norm and SGD updates on every mesh."""
  ref_params, ref_metrics = single_device_run
  params, metrics = _run_steps(sharding.make_mesh(shape))
  for m, r in zip(metrics, ref_metrics):
    np.testing.assert_allclose(m["correct_sum"], r["correct_sum"])
  assert_same_training(params, metrics, ref_params, ref_metrics, _PARAMS["p"])


def test_gradient_accumulation_is_exact(single_device_run):
  """2 micro-batches of 4 prompts on a (2, 2, 2) mesh == the whole batch on one device."""
  ref_params, ref_metrics = single_device_run
  params, metrics = _run_steps(sharding.make_mesh((2, 2, 2)), accum=2)
  assert_same_training(params, metrics, ref_params, ref_metrics, _PARAMS["p"],
                       keys=("loss", "correct_sum"))


def test_comparisons_with_fewer_than_two_responses_are_refused():
  batch = comparison_batch(0, batch=4)
  batch["index"] = np.arange(4, dtype=np.int32) + 40
  batch["response_valid"][2] = 0.0
  batch["response_valid"][2, 0] = 1.0
  with pytest.raises(UserError, match=r"^comparisons record 42: has K = 1 response\(s\); the "
                                      r"ranking loss needs K >= 2"):
    rm.check_comparisons(batch)
  batch["index"][2] = -1            # a padding row of a last batch is fine
  rm.check_comparisons(batch)


def test_pair_accuracy_numpy_matches_jax():
  b = comparison_batch(3)
  scores = np.random.default_rng(0).normal(size=b["ranks"].shape)
  from rlhf_jax import losses
  c, n = losses.ranking_accuracy(jnp.asarray(scores), jnp.asarray(b["ranks"]),
                                 jnp.asarray(b["response_valid"]))
  c2, n2 = rm.pair_accuracy(scores, b["ranks"], b["response_valid"])
  assert (float(c), float(n)) == pytest.approx((c2, n2))


def test_init_from_a_model_of_another_shape_is_refused(tmp_path):
  from rlhf_jax.convert import save_model
  other = get_model_config("tiny", num_layers=3)
  save_model(str(tmp_path / "m"), other, jax.device_get(init_params(other, jax.random.key(0))),
             fmt="rlhf_jax")
  with pytest.raises(UserError, match=r"another shape than config.model \(num_layers 3 vs 2\)"):
    stage_io.load_init_model(str(tmp_path / "m"), get_model_config("tiny"), "config.init_from")
