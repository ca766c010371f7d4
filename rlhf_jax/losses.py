"""Small pure loss functions. Each returns SUMS and COUNTS (never means), so that gradient
accumulation over micro-batches and sums over devices/hosts stay exact: the caller divides once,
after summing every part (`total_sum / total_count`).

Conventions (see `rlhf_jax.data.encoding`): masks are aligned with the TOKENS AS TARGETS, so
`mask[t] = 1` means token t is predicted from position t-1.
"""
import jax
import jax.numpy as jnp


def lm_loss(logits, tokens, loss_mask):
  """Masked next-token cross-entropy as (sum, count).

    sum   = sum_{b, t >= 1} mask[b, t] * -log softmax(logits[b, t-1])[tokens[b, t]]
    count = sum_{b, t >= 1} mask[b, t]

  logits (B, T, V) (any float dtype, computed in float32), tokens (B, T) int, loss_mask (B, T).
  The SFT loss is `sum / count` with the mask on response tokens only; the pretraining (ptx) loss
  is the same with the mask on every token but each document's first.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = logz - picked
  return jnp.sum(nll * mask), jnp.sum(mask)


def gather_last(values, last_index):
  """values (N, T) read at `last_index` (N,): the reward/value at each row's last token."""
  return jnp.take_along_axis(values, last_index[:, None].astype(jnp.int32), axis=1)[:, 0]


def preference_pairs(ranks, valid):
  """(B, K, K) float32 mask of ordered pairs (w, l): both responses present and rank_w < rank_l.

  Ranks: 0 = best; equal ranks (ties) give no pair; responses with `valid` 0 (padding) none.
  """
  valid = valid > 0
  both = valid[:, :, None] & valid[:, None, :]
  return (both & (ranks[:, :, None] < ranks[:, None, :])).astype(jnp.float32)


def ranking_loss(rewards, ranks, valid):
  """The InstructGPT reward-model loss over all C(K, 2) pairs of each prompt, as (sum, count).

  Per prompt b with K_b = sum_k valid[b, k] responses:

    loss_b = -1 / C(K_b, 2) * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l)

  Pairs of equal rank (ties) contribute nothing but still count in C(K_b, 2), exactly as the
  formula reads. sum = sum_b loss_b over prompts with K_b >= 2, count = number of such prompts,
  so `sum / count` is the paper's expectation over prompts: each prompt is ONE batch element,
  whatever its K (which is what stops the reward model over-fitting to prompts with many pairs).

  rewards (B, K) float, ranks (B, K) int, valid (B, K) float/bool (0 on padding responses).
  """
  rewards = rewards.astype(jnp.float32)
  pairs = preference_pairs(ranks, valid)
  k = jnp.sum(valid > 0, axis=1).astype(jnp.float32)
  num_pairs = k * (k - 1) / 2
  margin = rewards[:, :, None] - rewards[:, None, :]
  per_prompt = -jnp.sum(pairs * jax.nn.log_sigmoid(margin), axis=(1, 2))
  has_pairs = (k >= 2).astype(jnp.float32)
  per_prompt = per_prompt / jnp.maximum(num_pairs, 1.0) * has_pairs
  return jnp.sum(per_prompt), jnp.sum(has_pairs)


def ranking_accuracy(rewards, ranks, valid):
  """Pairwise accuracy as (correct, pairs) over the pairs of `preference_pairs`.

    correct = sum_{(w, l)} [r_w > r_l] + 0.5 [r_w == r_l],   pairs = number of (w, l)

  i.e. the fraction of labeled preferences the scores reproduce (a score tie counts half, so a
  constant scorer gets 0.5).
  """
  rewards = rewards.astype(jnp.float32)
  pairs = preference_pairs(ranks, valid)
  margin = rewards[:, :, None] - rewards[:, None, :]
  hit = (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
  return jnp.sum(pairs * hit), jnp.sum(pairs)
