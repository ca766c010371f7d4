"""Losses against brute-force float64 numpy references over explicit pairs / tokens."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

K_MAX = 9


def _random_comparisons(rng, batch):
  """Rewards, ranks, valid (B, K_MAX): K in 2..9 per prompt, random ties, padded to K_MAX."""
  rewards = rng.normal(size=(batch, K_MAX)) * 2.0
  ranks = np.full((batch, K_MAX), -1, np.int32)
  valid = np.zeros((batch, K_MAX), np.float32)
  for b in range(batch):
    k = int(rng.integers(2, K_MAX + 1))
    r = rng.integers(0, max(1, k - int(rng.integers(0, k))), size=k)   # often with ties
    if b % 4 == 0:
      r = rng.permutation(k)            # no ties
    ranks[b, :k], valid[b, :k] = r, 1.0
  return rewards.astype(np.float32), ranks, valid


def _explicit_pairs(ranks, valid):
  """[(b, w, l)] for every pair of present responses with rank_w < rank_l."""
  out = []
  for b in range(ranks.shape[0]):
    k = int(valid[b].sum())
    for i, j in itertools.permutations(range(k), 2):
      if ranks[b, i] < ranks[b, j]:
        out.append((b, i, j))
  return out


def _reference_ranking(rewards, ranks, valid):
  """float64 loss and d loss / d rewards of mean_b[-1/C(K_b,2) sum_pairs log sigmoid(r_w - r_l)]."""
  r = rewards.astype(np.float64)
  batch = r.shape[0]
  loss, grad = 0.0, np.zeros_like(r)
  for b, w, l in _explicit_pairs(ranks, valid):
    k = valid[b].sum()
    c = k * (k - 1) / 2
    d = r[b, w] - r[b, l]
    loss += np.log1p(np.exp(-d)) / c / batch             # -log sigmoid(d)
    g = -(1.0 - 1.0 / (1.0 + np.exp(-d))) / c / batch    # d/dd of -log sigmoid(d)
    grad[b, w] += g
    grad[b, l] -= g
  return loss, grad


@pytest.mark.parametrize("seed", range(6))
def test_ranking_loss_and_gradient_match_explicit_pairs(seed):
  rng = np.random.default_rng(seed)
  rewards, ranks, valid = _random_comparisons(rng, batch=16)

  def mean_loss(r):
    s, c = losses.ranking_loss(r, jnp.asarray(ranks), jnp.asarray(valid))
    return s / c

  ours, grad = jax.value_and_grad(mean_loss)(jnp.asarray(rewards))
  ref_loss, ref_grad = _reference_ranking(rewards, ranks, valid)
  np.testing.assert_allclose(float(ours), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
  # Padding responses get no gradient, whatever their (garbage) reward.
  assert np.all(np.asarray(grad)[valid == 0] == 0)


def test_ranking_loss_counts_prompts_and_drops_ties():
  rewards = jnp.asarray([[1.0, 0.0, 5.0], [2.0, 2.0, 0.0]])
  ranks = jnp.asarray([[0, 1, 1], [0, 0, -1]])
  valid = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  s, c = losses.ranking_loss(rewards, ranks, valid)
  # Prompt 0: pairs (0,1) and (0,2) out of C(3,2) = 3 (the tie 1~2 is dropped); prompt 1: all tie.
  expected = -(np.log(1 / (1 + np.exp(-1.0))) + np.log(1 / (1 + np.exp(4.0)))) / 3
  np.testing.assert_allclose(float(s), expected, rtol=1e-6)
  assert float(c) == 2.0
  # A prompt with fewer than 2 responses is not a batch element (count 0, loss 0).
  s1, c1 = losses.ranking_loss(jnp.ones((1, 3)), jnp.asarray([[0, -1, -1]]),
                               jnp.asarray([[1.0, 0.0, 0.0]]))
  assert float(s1) == 0.0 and float(c1) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_ranking_accuracy_matches_explicit_pairs(seed):
  rng = np.random.default_rng(100 + seed)
  rewards, ranks, valid = _random_comparisons(rng, batch=12)
  rewards[0, 1] = rewards[0, 0]          # a score tie counts half
  pairs = _explicit_pairs(ranks, valid)
  ref = sum(1.0 if rewards[b, w] > rewards[b, l] else 0.5 if rewards[b, w] == rewards[b, l]
            else 0.0 for b, w, l in pairs)
  correct, n = losses.ranking_accuracy(jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(valid))
  assert float(n) == len(pairs)
  np.testing.assert_allclose(float(correct), ref, rtol=1e-6)


def test_lm_loss_matches_numpy_and_masks_targets():
  rng = np.random.default_rng(0)
  b, t, v = 3, 7, 11
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = (rng.random((b, t)) < 0.6).astype(np.float32)
  s, c = losses.lm_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  ref_sum, ref_count = 0.0, 0.0
  x = logits.astype(np.float64)
  for i in range(b):
    for j in range(1, t):
      if mask[i, j]:
        logp = x[i, j - 1] - np.log(np.exp(x[i, j - 1]).sum())
        ref_sum -= logp[tokens[i, j]]
        ref_count += 1
  np.testing.assert_allclose(float(s), ref_sum, rtol=1e-5)
  assert float(c) == ref_count
  # Masked targets do not matter: change every masked-out token, the loss stays.
  other = np.where(mask > 0, tokens, (tokens + 1) % v)
  s2, _ = losses.lm_loss(jnp.asarray(logits), jnp.asarray(other), jnp.asarray(mask))
  np.testing.assert_allclose(float(s2), float(s), rtol=1e-6)


def test_gather_last():
  values = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(losses.gather_last(values, jnp.asarray([0, 3, 1])), [0.0, 7.0, 9.0])
