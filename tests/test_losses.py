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


# ----------------------------------------------------------------------------- DPO

def _reference_dpo(logp, ref_logp, ranks, valid, beta):
  """float64 DPO loss and d loss / d logp over explicit pairs: mean over prompts with K_b >= 2 of
  -1/C(K_b,2) sum_{(w,l)} log sigmoid(beta ((logpi_w - logref_w) - (logpi_l - logref_l)))."""
  lp, lr = logp.astype(np.float64), ref_logp.astype(np.float64)
  prompts = sum(1 for b in range(len(valid)) if valid[b].sum() >= 2)
  loss, grad = 0.0, np.zeros_like(lp)
  for b, w, l in _explicit_pairs(ranks, valid):
    k = valid[b].sum()
    c = k * (k - 1) / 2
    z = beta * ((lp[b, w] - lr[b, w]) - (lp[b, l] - lr[b, l]))
    loss += np.log1p(np.exp(-z)) / c / prompts
    g = -beta / (1.0 + np.exp(z)) / c / prompts       # d/dlogpi_w of -log sigmoid(z)
    grad[b, w] += g
    grad[b, l] -= g
  return loss, grad


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 0.1), (2, 0.5), (3, 2.0)])
def test_dpo_loss_and_gradient_match_explicit_pairs(seed, beta):
  rng = np.random.default_rng(200 + seed)
  _, ranks, valid = _random_comparisons(rng, batch=16)
  logp = (-rng.uniform(1.0, 30.0, size=ranks.shape)).astype(np.float32)
  ref_logp = (logp + rng.normal(size=ranks.shape) * 3.0).astype(np.float32)

  def mean_loss(lp):
    s, c = losses.dpo_loss(lp, jnp.asarray(ref_logp), jnp.asarray(ranks), jnp.asarray(valid), beta)
    return s / c

  ours, grad = jax.value_and_grad(mean_loss)(jnp.asarray(logp))
  ref_loss, ref_grad = _reference_dpo(logp, ref_logp, ranks, valid, beta)
  np.testing.assert_allclose(float(ours), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(grad)[valid == 0] == 0)
  # Sums and counts: any split of the prompts (micro-batches) adds up to the whole batch.
  parts = [losses.dpo_loss(jnp.asarray(logp[i:i + 4]), jnp.asarray(ref_logp[i:i + 4]),
                           jnp.asarray(ranks[i:i + 4]), jnp.asarray(valid[i:i + 4]), beta)
           for i in range(0, 16, 4)]
  total = sum(float(s) for s, _ in parts) / sum(float(c) for _, c in parts)
  np.testing.assert_allclose(total, ref_loss, rtol=1e-5)


def test_dpo_loss_at_the_reference_is_log_2_and_accuracy_one_half():
  """The policy equal to the reference: every implicit reward 0, loss log 2 per compared pair
  (times the pairs' share of C(K,2)), and implicit-reward accuracy exactly one half."""
  rng = np.random.default_rng(7)
  _, ranks, valid = _random_comparisons(rng, batch=8)
  logp = jnp.asarray(-rng.uniform(1.0, 9.0, size=ranks.shape).astype(np.float32))
  s, c = losses.dpo_loss(logp, logp, jnp.asarray(ranks), jnp.asarray(valid), 0.1)
  share = [sum(1 for bb, _, _ in _explicit_pairs(ranks, valid) if bb == b)
           / (valid[b].sum() * (valid[b].sum() - 1) / 2) for b in range(8)]
  np.testing.assert_allclose(float(s) / float(c), np.log(2.0) * np.mean(share), rtol=1e-6)
  h = losses.dpo_implicit_rewards(logp, logp, 0.1)
  correct, pairs = losses.ranking_accuracy(h, jnp.asarray(ranks), jnp.asarray(valid))
  assert float(correct) == 0.5 * float(pairs) > 0


def test_sequence_logprobs_matches_numpy():
  rng = np.random.default_rng(3)
  n, t, v = 4, 6, 9
  logits = rng.normal(size=(n, t, v)).astype(np.float32) * 2.0
  tokens = rng.integers(0, v, size=(n, t)).astype(np.int32)
  mask = np.zeros((n, t), np.float32)
  for i in range(n):                     # a response: positions a..b-1 (a >= 1)
    a = int(rng.integers(1, t))
    mask[i, a:int(rng.integers(a, t + 1))] = 1.0
  got = losses.sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  x = logits.astype(np.float64)
  ref = np.zeros(n)
  for i in range(n):
    for j in range(1, t):
      if mask[i, j]:
        ref[i] += x[i, j - 1, tokens[i, j]] - np.log(np.exp(x[i, j - 1]).sum())
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
