"""Causal attention in query blocks with a recomputing backward pass (attention_impl 'blocked').

The reference (`transformer._einsum_attention`) forms the full (T, S) float32 score matrix for
every head and lets autodiff keep the probabilities for the backward pass. On CPU that costs
twice: half of the scores are above the diagonal and always masked, and the kept probabilities
(B x H x T x S floats per layer, 600 MB for GPT-2 small at 4 x 512) are written and read back
through memory, which on this machine costs more than the matmuls around them.

Here the T queries are cut into blocks of `block` rows; block i (rows r0..r1) only looks at keys
0..r1 (a key after its last row is masked by causality), so about half the score matrix is never
formed. Per block, with s = scale * q k^T masked to -1e30 (finite: a fully masked row gets
uniform weights, as in the reference):

  forward    m = max_j s_j,  l = sum_j exp(s_j - m),  o = sum_j exp(s_j - m) v_j / l,
             lse = m + log l                                  (kept: o and lse, (B, H, T))
  backward   p = exp(s - lse)  (recomputed),  delta = sum_d do_d o_d,
             dv += p^T do,  dp = do v^T,  ds = p * (dp - delta),
             dq = scale * ds k,  dk += scale * ds^T q

(delta equals sum_j p_j dp_j, the softmax Jacobian's row term, as in FlashAttention.) The
residuals are q, k, v, the mask, o and lse: O(T) floats per row instead of O(T * S). A fully
masked (padding) row's recomputed p is not its forward's uniform weights, but no real token
attends to padding and losses mask it, so its output's cotangent, and its gradient, are 0.

Only for the training / scoring forward (no KV cache) with a causal mask: the caller passes the
(B, T, S = T) boolean mask, which already contains causality, segments and padding.
"""
import functools

import jax
import jax.numpy as jnp

_MASKED = -1e30


def block_bounds(t: int, block: int):
  """[(r0, r1), ...]: the query rows of each block (the last one may be shorter)."""
  return [(r0, min(r0 + block, t)) for r0 in range(0, t, block)]


def default_block(t: int) -> int:
  """Rows per query block: 128 (at least 4 blocks from T = 512 up), whole T below 256, and at
  most 16 blocks (T / 16 rounded up to a multiple of 128) so long rows do not unroll too far."""
  if t < 256:
    return t
  rows = -(-t // 16)
  return max(128, -(-rows // 128) * 128)


def _scores(qh, kh, mask):
  """qh (B, K, G, R, D) scaled, kh (B, K, E, D), mask (B, R, E) -> masked float32 scores
  (B, K, G, R, E)."""
  s = jnp.einsum("bkgrd,bked->bkgre", qh, kh, preferred_element_type=jnp.float32)
  return jnp.where(mask[:, None, None], s, _MASKED)


def _heads_major(q, k, v):
  """(B, T, K, G, D), (B, T, K, D) x 2 -> (B, K, G, T, D) scaled by D^-1/2, (B, K, T, D) x 2:
  one transpose each, so every block's matmuls are plain batched ones over (B, K[, G])."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  return (q.transpose(0, 2, 3, 1, 4) * scale, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def _forward(q, k, v, mask, block):
  qh, kh, vh = _heads_major(q, k, v)
  outs, lses = [], []
  for r0, r1 in block_bounds(q.shape[1], block):
    s = _scores(qh[:, :, :, r0:r1], kh[:, :, :r1], mask[:, r0:r1, :r1])
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    outs.append(jnp.einsum("bkgre,bked->bkgrd", (e / l).astype(vh.dtype), vh[:, :, :r1]))
    lses.append((m + jnp.log(l))[..., 0])
  out = jnp.concatenate(outs, axis=3)                       # (B, K, G, T, D)
  return out.transpose(0, 3, 1, 2, 4), out, jnp.concatenate(lses, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_attention(q, k, v, mask, block):
  """Causal softmax attention, q (B, T, K, G, D) unscaled (K kv heads of G query heads each),
  k and v (B, T, K, D), mask (B, T, T) boolean and causal; returns (B, T, K, G, D)."""
  return _forward(q, k, v, mask, block)[0]


def _fwd(q, k, v, mask, block):
  out, out_h, lse = _forward(q, k, v, mask, block)
  return out, (q, k, v, mask, out_h, lse)


def _bwd(block, residuals, dout):
  q, k, v, mask, out_h, lse = residuals
  qh, kh, vh = _heads_major(q, k, v)
  do_h = dout.transpose(0, 2, 3, 1, 4)                      # (B, K, G, T, D)
  delta = jnp.sum(do_h.astype(jnp.float32) * out_h.astype(jnp.float32), axis=-1)
  dq_blocks = []
  dk = jnp.zeros(kh.shape, jnp.float32)
  dv = jnp.zeros(vh.shape, jnp.float32)
  for r0, r1 in block_bounds(q.shape[1], block):
    s = _scores(qh[:, :, :, r0:r1], kh[:, :, :r1], mask[:, r0:r1, :r1])
    p = jnp.exp(s - lse[..., r0:r1, None])
    do = do_h[:, :, :, r0:r1]
    dv = dv.at[:, :, :r1].add(jnp.einsum("bkgre,bkgrd->bked", p, do,
                                         preferred_element_type=jnp.float32))
    dp = jnp.einsum("bkgrd,bked->bkgre", do, vh[:, :, :r1], preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., r0:r1, None])
    dq_blocks.append(jnp.einsum("bkgre,bked->bkgrd", ds, kh[:, :, :r1],
                                preferred_element_type=jnp.float32))
    dk = dk.at[:, :, :r1].add(jnp.einsum("bkgre,bkgrd->bked", ds, qh[:, :, :, r0:r1],
                                         preferred_element_type=jnp.float32))
  scale = q.shape[-1] ** -0.5
  dq = jnp.concatenate(dq_blocks, axis=3).transpose(0, 3, 1, 2, 4) * scale
  return (dq.astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
          dv.transpose(0, 2, 1, 3).astype(v.dtype), None)


blocked_attention.defvjp(_fwd, _bwd)
