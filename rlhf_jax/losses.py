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


# ----------------------------------------------------------------------------- PPO (stage 3)
#
# Per-token arrays are (B, N) over the N response positions; `mask` is 1 on generated tokens up
# to and including EOS. Values, log-probs and rewards at masked positions are ignored.

# Log-ratios are clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] before `exp` (ratio <= 4.9e8, far
# from float32 overflow) and in the KL estimators: one wild token cannot make the loss or its
# gradient inf/NaN. Inside the bound nothing changes; a clamped token's ratio has zero gradient.
LOG_RATIO_BOUND = 20.0


def clamped_log_ratio(logp, other_logp):
  """log(p / q) = logp - other_logp, clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND]."""
  return jnp.clip(logp - other_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def masked_mean(x, mask):
  """sum(x * mask) / max(sum(mask), 1)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x, mask, shift_mean=True, eps=1e-8):
  """Normalises x over the masked entries: (x - mean) / sqrt(var + eps), var the population
  variance of the masked entries; with shift_mean=False the mean is added back (reward whitening
  rescales without moving the mean). Masked-out entries come back as 0."""
  mask = mask.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def gae(rewards, values, mask, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2016) along each response.

    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}          (A_N = 0, m_N = 0)
    R_t     = A_t + V_t                                         (the value target)

  m is the response mask (a prefix of ones), so the value after the last real token is 0 and
  nothing flows back from padding. Returns (advantages, returns), both 0 where mask is 0.
  rewards, values, mask: (B, N).
  """
  mask = mask.astype(jnp.float32)
  rewards, values = rewards * mask, values * mask
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  deltas = rewards + gamma * next_mask * next_values - values

  def step(next_adv, xs):
    delta, m_next = xs
    adv = delta + gamma * lam * m_next * next_adv
    return adv, adv
  _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32),
                        (deltas.T, next_mask.T), reverse=True)
  adv = adv.T * mask
  return adv, (adv + values) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps):
  """The clipped surrogate (PPO, Schulman et al. 2017) as (sum, count, stats).

    ratio_t = exp(clamp(logp_t - old_logp_t))
    loss_t  = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
    sum = sum_t m_t loss_t,  count = sum_t m_t

  stats (sums over masked tokens unless named _max): clipped_sum (tokens where the clipped term
  is the larger), approx_kl_sum (k3 = (ratio - 1) - log ratio, >= 0, 0 iff ratio = 1),
  ratio_sum, ratio_max.
  """
  mask = mask.astype(jnp.float32)
  log_ratio = clamped_log_ratio(logp, old_logp)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = jnp.maximum(unclipped, clipped)
  stats = {"clipped_sum": jnp.sum((clipped > unclipped) * mask),
           "approx_kl_sum": jnp.sum(((ratio - 1.0) - log_ratio) * mask),
           "ratio_sum": jnp.sum(ratio * mask),
           "ratio_max": jnp.max(jnp.where(mask > 0, ratio, -jnp.inf))}
  return jnp.sum(loss * mask), jnp.sum(mask), stats


def ppo_value_loss(values, old_values, returns, mask, clip_eps):
  """The clipped value loss as (sum, count).

    V_clip = old_V + clip(V - old_V, -eps, eps)
    loss_t = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)
  """
  mask = mask.astype(jnp.float32)
  v_clip = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  loss = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(v_clip - returns))
  return jnp.sum(loss * mask), jnp.sum(mask)


def token_logprobs(logits, targets, temperature=1.0):
  """log softmax(logits / T)[target] and the entropy of softmax(logits / T), per position.

  logits (B, N, V), targets (B, N) -> two (B, N) float32 arrays.
  """
  z = logits.astype(jnp.float32) / temperature
  logz = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  probs = jax.nn.softmax(z, axis=-1)
  entropy = logz - jnp.sum(probs * z, axis=-1)
  return picked - logz, entropy


def kl_penalty_rewards(logp, ref_logp, scores, mask, kl_coef):
  """The per-token reward of InstructGPT's PPO objective.

    r_t = -beta * clamp(logp_t - ref_logp_t) + [t = last real token] * score

  so sum_t r_t = r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) per episode. Returns
  (rewards (B, N), per-sequence KL estimate sum_t m_t (logp_t - ref_logp_t) (B,)).
  """
  mask = mask.astype(jnp.float32)
  kl = clamped_log_ratio(logp, ref_logp) * mask
  lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
  last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), mask.shape[1], dtype=jnp.float32)
  return -kl_coef * kl + last * scores[:, None] * mask, jnp.sum(kl, axis=1)


def adaptive_kl_coef(kl_coef, kl, target, horizon, num_episodes):
  """The Ziegler et al. (2019) proportional KL controller.

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * num_episodes / horizon)
  """
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + error * num_episodes / horizon)


# ----------------------------------------------------------------------------- DPO
#
# Direct preference optimisation (Rafailov et al. 2023) on the reward model's comparisons: a
# batch holds B prompts with K ranked responses each, the policy's and the frozen reference's
# summed response log-probs are (B, K) arrays.


def sequence_logprobs(logits, tokens, mask):
  """Summed log-prob of each row's masked tokens (its response, eos included), (N,) float32.

    out[n] = sum_{t >= 1} mask[n, t] * log softmax(logits[n, t-1])[tokens[n, t]]

  logits (N, T, V), tokens (N, T) int, mask (N, T) aligned with the tokens as targets.
  """
  logp, _ = token_logprobs(logits[:, :-1], tokens[:, 1:])
  return jnp.sum(logp * mask[:, 1:].astype(jnp.float32), axis=1)


def dpo_implicit_rewards(logp, ref_logp, beta):
  """DPO's implicit reward of each response: beta * (log pi(y|x) - log pi_ref(y|x))."""
  return beta * (logp.astype(jnp.float32) - ref_logp.astype(jnp.float32))


def dpo_loss(logp, ref_logp, ranks, valid, beta):
  """The DPO loss over all C(K, 2) pairs of each prompt, as (sum, count).

  With h_k = beta * (log pi(y_k|x) - log pi_ref(y_k|x)) (`dpo_implicit_rewards`), per prompt b
  with K_b = sum_k valid[b, k] responses:

    loss_b = -1 / C(K_b, 2) * sum_{(w, l): rank_w < rank_l}
                 log sigmoid(beta * ((logpi_w - logref_w) - (logpi_l - logref_l)))

  i.e. `ranking_loss` of the implicit rewards: each prompt is one batch element weighted like the
  reward model's (ties give no term but count in C(K_b, 2)), sum = sum_b loss_b over prompts with
  K_b >= 2, count = their number. logp, ref_logp (B, K) summed response log-probs
  (`sequence_logprobs`), ranks (B, K) int (0 = best), valid (B, K).
  """
  return ranking_loss(dpo_implicit_rewards(logp, ref_logp, beta), ranks, valid)
