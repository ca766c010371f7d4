"""Next-token log-probs and the LM loss of the one model, with the LM head's float32 logits whole
or a few positions at a time (`cfg.logits_chunk`).

With logits_chunk = c > 0 the model runs to its final hidden states (head 'none', (B, T, d)) and
the head, log-softmax, picked log-prob and entropy are computed for c positions at a time inside
a `lax.map` whose body is rematerialised (`jax.checkpoint`): forward and backward hold one
(B, c, V) block of logits instead of (B, T, V). Same numbers as the whole logits (per position the
same float32 logits and the same reductions; tested on values and gradients), a fraction of the
memory where the vocabulary is large (50k-128k ids: the logits are most of a step's temporaries).
With logits_chunk 0 the head's logits are computed whole: `lm_loss` is `forward(cfg, 'lm', ...)`
then `losses.lm_loss`; `next_token_logprobs` runs the head (`lm_head_logits`) on the hidden states
of the positions that predict a target, then `losses.token_logprobs`.
"""
import jax
import jax.numpy as jnp

from rlhf_jax import losses
from rlhf_jax.models.transformer import lm_head_logits
from rlhf_jax.train.step import forward


def chunked_token_logprobs(logits_fn, hidden, targets, temperature, chunk):
  """`losses.token_logprobs(logits_fn(hidden), targets, temperature)` computed `chunk` positions
  at a time: hidden (B, N, d), targets (B, N) -> (log p, entropy), each (B, N) float32, where
  log p_t = log softmax(l_t / T)[target_t] and entropy_t = -sum_v p_v log p_v of softmax(l_t / T).

  The positions are padded to a multiple of `chunk` (the padding's outputs are dropped); each
  chunk's logits are recomputed in the backward pass instead of being kept."""
  b, n, d = hidden.shape
  c = min(chunk, n)
  pad = -n % c
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  to_chunks = lambda x: x.reshape((b, -1, c) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(xs):
    h, t = xs
    return losses.token_logprobs(logits_fn(h), t, temperature)
  logp, entropy = jax.lax.map(one, (to_chunks(hidden), to_chunks(targets)))
  from_chunks = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :n]
  return from_chunks(logp), from_chunks(entropy)


def next_token_logprobs(cfg, params, batch, temperature=1.0, *, head_from=0, rng=None,
                        train=False):
  """(log p, entropy), each (B, T - 1 - head_from): log softmax(l_t / T)[x_{t+1}] and the entropy
  of softmax(l_t / T) for t = head_from .. T - 2, l_t the LM head's logits at position t of
  batch (tokens, segment_ids[, positions]); chunked when cfg.logits_chunk > 0."""
  targets = batch["tokens"][:, head_from + 1:]
  # The head on the positions that predict a target (not the last one): slicing the hidden
  # states rather than the logits, whose gradient would be padded back to the full (B, T, V).
  hidden = forward(cfg, "none", params, batch, rng=rng, train=train, head_from=head_from)[:, :-1]
  if not cfg.logits_chunk:
    return losses.token_logprobs(lm_head_logits(cfg, params, hidden), targets, temperature)
  return chunked_token_logprobs(lambda h: lm_head_logits(cfg, params, h), hidden, targets,
                                temperature, cfg.logits_chunk)


def lm_loss(cfg, params, batch, *, rng=None, train=False):
  """`losses.lm_loss` of the model on batch (tokens, segment_ids[, positions], loss_mask) as
  (sum, count): sum = sum_{t >= 1} mask_t * -log p(x_t | x_<t); chunked when cfg.logits_chunk."""
  if not cfg.logits_chunk:
    logits = forward(cfg, "lm", params, batch, rng=rng, train=train)
    return losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])
  logp, _ = next_token_logprobs(cfg, params, batch, rng=rng, train=train)
  mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return jnp.sum(-logp * mask), jnp.sum(mask)
