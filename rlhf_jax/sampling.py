"""Jitted sampling: one prefill, then a `lax.while_loop` of one-token decode steps over a KV cache.

    out = sample(params, cfg, prompts, prompt_segment_ids, rng, SamplingConfig(max_new_tokens=64))

Prompts are left-padded (B, P) with segment ids 1 on real tokens and 0 on padding, so every row's
last prompt token sits in the last column and all rows decode in lock step; each row still sees its own
positions (the cache tracks them). With `num_samples=K` the prompts are prefilled once and the cache is
repeated K times (rows b*K .. b*K+K-1 belong to prompt b): the RM data-collection and best-of-K case.

Per step, from the last logits l:  z = l / temperature; top-k keeps the k largest z; top-p keeps
the smallest set of tokens whose probability mass reaches p (the sort is skipped when top_p = 1);
the token is drawn from softmax(z) over what is kept, by inverse CDF (argmax when greedy). A row stops after its EOS;
the loop exits early once every row has stopped.

A batch can be sampled in chunks (`batch_rows`, `total_batch`: these prompts are rows
`batch_rows` of a batch of `total_batch`): every row then draws the uniform numbers it would draw
in one call on the whole batch, so the samples do not depend on how the batch is chunked (PPO's
`rollout_micro_batches`).

On CPU with one device the decode step runs feature-major (`models/feature_major.py`: the same
function, weights transposed once per call, or once for many calls by `decode_weights`, faster
matrix-vector products on XLA:CPU).

Returned log-probs are log softmax(l / temperature)[token], with no top-k/top-p mask: exactly what a
fresh forward pass at the same temperature gives, which is what the PPO ratio needs.

`decode_weights` prepares the weights for decoding once (per layer, cast, resharded into the
decode layout; on CPU the feature-major copy) where a caller samples many tokens: PPO's rollout
inside its jit, the `generate` command at load.
"""
import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, Transformer, abstract_params, init_cache, unstack_layers
from rlhf_jax.models import feature_major
from rlhf_jax.models import int8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0            # 0: off
  top_p: float = 1.0        # 1.0: off
  greedy: bool = False
  eos_token_id: Optional[int] = None   # None: never stop early
  pad_token_id: int = 0                # written after a row's EOS
  entropy: bool = False                # also return each step's entropy (Samples.entropy)

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
    if not self.temperature > 0:
      raise UserError(f"temperature must be > 0, got {self.temperature}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise UserError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


class Samples(NamedTuple):
  tokens: jax.Array      # (B*K, N) int32; pad_token_id after a row's EOS
  mask: jax.Array        # (B*K, N) float32; 1 on generated tokens up to and including EOS
  logprobs: jax.Array    # (B*K, N) float32; log softmax(logits / T) of the chosen token, 0 where masked
  lengths: jax.Array     # (B*K,) int32; number of generated tokens (EOS included)
  # (B*K, N) float32 with SamplingConfig.entropy: the entropy of softmax(logits / T) at each
  # step (unfiltered, as logprobs), 0 where masked; else None
  entropy: Optional[jax.Array] = None


def step_entropy(logits: jax.Array, temperature: float) -> jax.Array:
  """H = -sum_v p_v log p_v of p = softmax(logits / T), per row of logits (B, V): the formula of
  `losses.token_logprobs`, which PPO's scoring forward uses, on (B, V) rows (the same reduction
  over a (B, 1, V) array ran 3.5x slower on XLA:CPU)."""
  return losses.token_logprobs(logits, jnp.zeros(logits.shape[:1], jnp.int32), temperature)[1]


def filter_logits(z: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Top-k then top-p (nucleus) filtering of scaled logits z (..., V): removed entries -> -inf."""
  if top_k and top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z < kth, -jnp.inf, z)
  if top_p < 1.0:
    sorted_z = jnp.sort(z, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_z, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep a token while the mass of strictly more likely tokens is still below top_p.
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_z, n_keep - 1, axis=-1)
    z = jnp.where(z < threshold, -jnp.inf, z)
  return z


def _uniforms(rng, rows: int, draw_rows=None):
  """(rows, 1) uniform numbers in [0, 1): jax.random.uniform(rng, (rows, 1)), or with draw_rows =
  (row indices (rows,), total) those rows of jax.random.uniform(rng, (total, 1))."""
  if draw_rows is None:
    return jax.random.uniform(rng, (rows, 1), jnp.float32)
  index, total = draw_rows
  return jax.random.uniform(rng, (total, 1), jnp.float32)[index]


# Block width of the two-level inverse-CDF search (`inverse_cdf`).
CDF_BLOCK = 128


def first_argmax(z: jax.Array) -> jax.Array:
  """jnp.argmax(z, -1) for finite z (the first index of the maximum), as two plain reductions:
  XLA:CPU runs argmax's (value, index) reduction element by element, about 10x slower than a
  max and a min over the same array."""
  iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
  return jnp.min(jnp.where(z == jnp.max(z, -1, keepdims=True), iota, z.shape[-1]), -1)


def _last_positive(x: jax.Array) -> jax.Array:
  """Index of the last entry > 0 along the last axis (0 if none)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.max(jnp.where(x > 0, iota, 0), -1)


def inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
  """token = the first index i with cdf_i > u * cdf_V (cdf = cumulative sum of the unnormalised
  probs (B, V) >= 0, u (B, 1) uniform in [0, 1)): a draw from probs / sum(probs).

  Two levels instead of one cumulative sum over V (a long associative scan on CPU): the sums of
  blocks of CDF_BLOCK entries, their cumulative sum (V / CDF_BLOCK entries) picks the block, then
  a cumulative sum inside that block picks the token. Both picks are clamped to the last block /
  entry with positive mass, so rounding (u * total at the very end of the CDF, or the in-block
  sums falling short of the block's total) never lands on a zero-probability token."""
  b, v = probs.shape
  nb = -(-v // CDF_BLOCK)
  p = jnp.pad(probs, ((0, 0), (0, nb * CDF_BLOCK - v))).reshape(b, nb, CDF_BLOCK)
  sums = p.sum(-1)
  cdf = jnp.cumsum(sums, -1)
  target = u * cdf[:, -1:]
  block = jnp.minimum(jnp.sum(cdf <= target, -1), _last_positive(sums))
  before = jnp.take_along_axis(cdf - sums, block[:, None], -1)
  inner = jnp.take_along_axis(p, block[:, None, None], 1)[:, 0]
  inner_cdf = before + jnp.cumsum(inner, -1)
  k = jnp.minimum(jnp.sum(inner_cdf <= target, -1), _last_positive(inner))
  return block * CDF_BLOCK + k


def choose_token(logits: jax.Array, rng, sc: SamplingConfig, draw_rows=None):
  """(token, logprob at the sampling temperature) for each row of logits (B, V).

  Sampling is by inverse CDF (`inverse_cdf`): one uniform u per row, token = first index whose
  cumulative (filtered) probability exceeds u * total. Exact for the categorical distribution,
  and it needs B random numbers per step instead of B x V Gumbel draws. The log-prob is
  z_token - logsumexp(z) of the unfiltered z = logits / T (log_softmax(z)[token], without
  writing the whole log_softmax). draw_rows: see `_uniforms`.
  """
  z = logits.astype(jnp.float32) / sc.temperature
  shifted = z - jnp.max(z, axis=-1, keepdims=True)
  log_total = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  if sc.greedy:
    token = first_argmax(z)
  else:
    filtered = filter_logits(z, sc.top_k, sc.top_p) if (sc.top_k or sc.top_p < 1.0) else z
    probs = jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True))
    token = inverse_cdf(probs, _uniforms(rng, z.shape[0], draw_rows))
  logprob = jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0] - log_total
  return token.astype(jnp.int32), logprob


def decode_weights(params, cfg: ModelConfig, dtype: str = "", mesh=None):
  """(cfg, params) for `sample`, made ONCE per rollout inside the jitted caller (a PPO
  iteration): the stacked weights split per layer (`unstack_layers`), cast to `dtype` (e.g.
  'bfloat16'; '' keeps them), and with a mesh constrained to the decode layout
  (`sharding.decode_param_shardings`: tensor-parallel, replicated over data and fsdp), so the
  decode loop reads local weights instead of all-gathering FSDP shards every token. Slice, cast
  and reshard are one pass per leaf: the decode copy is the only extra copy of the weights
  (on CPU, below, with the feature-major copy beside it).
  The returned cfg decodes layer by layer (scan_layers False) with activations and the KV cache
  in `dtype`. dtype 'int8' instead quantizes the matmul weights (`models/int8.py`: int8 weights
  and activations, int32 sums; everything else float32), on one device (no `mesh`).

  Where `sample` decodes feature-major (float weights on CPU, one device, no `mesh`:
  `feature_major.use_feature_major`), the returned params also carry that step's weights under
  'feature_major' (`feature_major.transpose_params`), so a caller that samples many times from the
  same weights (`generate`, which prepares them once at load) does not split and transpose them in
  every `sample` call."""
  dcfg = cfg.replace(scan_layers=False)
  params = unstack_layers(params) if cfg.scan_layers else params
  if dtype == "int8":
    if mesh is not None:
      raise UserError("int8 decoding runs on one device; drop the decode layout (mesh)")
    return dcfg, int8.quantize_params(params)
  if dtype:
    dcfg = dcfg.replace(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  if mesh is not None:
    shardings = sharding.decode_param_shardings(abstract_params(dcfg, "lm", boxed=True), mesh)
    params = jax.lax.with_sharding_constraint(params, shardings)
  elif feature_major.use_feature_major(params):
    params = dict(params, feature_major=feature_major.transpose_params(params, dcfg))
  return dcfg, params


def _repeat_rows(cache, k: int):
  """Repeat every batch row of a per-layer cache k times (row b -> rows b*k .. b*k+k-1)."""
  if k == 1:
    return cache
  rep = lambda x: jnp.repeat(x, k, axis=0)
  return {name: (tuple(map(rep, x)) if name in ("k", "v") else x if x.ndim == 0 else rep(x))
          for name, x in cache.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "num_samples", "total_batch"))
def sample(params, cfg: ModelConfig, prompts: jax.Array, prompt_segment_ids: jax.Array, rng,
           sc: SamplingConfig, num_samples: int = 1, batch_rows: Optional[jax.Array] = None,
           total_batch: int = 0) -> Samples:
  """Samples `sc.max_new_tokens` tokens after left-padded `prompts` (B, P); see the module doc.
  batch_rows (B,) int32 and total_batch: these prompts are rows `batch_rows` of a batch of
  `total_batch` prompts sampled in chunks (the samples are those of the whole batch's rows)."""
  # The feature-major step's weights when `decode_weights` prepared them (else made below).
  params = dict(params)
  fm = params.pop("feature_major", None)
  # Decode layer by layer with per-layer weights and cache buffers: split the stacked parameters
  # once here, so the loop never slices (copies) weights or caches.
  if cfg.scan_layers:
    cfg, params = cfg.replace(scan_layers=False), unstack_layers(params)
  model = Transformer(cfg)
  b, p = prompts.shape
  n = sc.max_new_tokens
  cache = init_cache(cfg, b, p + n)
  logits, cache = model.apply({"params": params}, prompts, segment_ids=prompt_segment_ids,
                              cache=cache, last_only=True)
  cache = _repeat_rows(cache, num_samples)
  last = jnp.repeat(logits[:, -1], num_samples, axis=0)
  rows = b * num_samples
  draw_rows = None
  if batch_rows is not None:   # row r of prompt q: q * K + r in the whole batch
    if total_batch < b:
      raise UserError(f"sample: total_batch ({total_batch}) must be at least the {b} prompts "
                      "of batch_rows")
    index = (batch_rows[:, None] * num_samples + jnp.arange(num_samples)).reshape(-1)
    draw_rows = (index, total_batch * num_samples)

  rng, first = jax.random.split(rng)
  token, logprob = choose_token(last, first, sc, draw_rows)
  done = (token == sc.eos_token_id) if sc.eos_token_id is not None else jnp.zeros(rows, bool)
  tokens = jnp.full((rows, n), sc.pad_token_id, jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((rows, n), jnp.float32).at[:, 0].set(logprob)
  # (per-step entropies, or an empty carry when not asked for)
  entropy = (jnp.zeros((rows, n), jnp.float32).at[:, 0].set(step_entropy(last, sc.temperature))
             if sc.entropy else jnp.zeros((rows, 0), jnp.float32))
  lengths = jnp.ones((rows,), jnp.int32)

  def cond(state):
    i, _, _, _, _, _, done, _, _ = state
    return (i < n) & ~jnp.all(done)

  # The one-token step: (logits (rows, V), new cache). On CPU with one device it runs
  # feature-major on weights transposed once: here, or by `decode_weights` beforehand.
  if feature_major.use_feature_major(params):
    fm = feature_major.transpose_params(params, cfg) if fm is None else fm
    step = lambda token, cache: feature_major.decode_step(fm, cfg, token, cache)
  else:
    def step(token, cache):
      logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
      return logits[:, 0], cache

  def body(state):
    i, cache, token, tokens, logprobs, entropy, done, lengths, rng = state
    rng, step_rng = jax.random.split(rng)
    logits, cache = step(token, cache)
    new, logprob = choose_token(logits, step_rng, sc, draw_rows)
    new = jnp.where(done, sc.pad_token_id, new)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], i, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(
        logprobs, jnp.where(done, 0.0, logprob)[:, None], i, axis=1)
    if sc.entropy:
      entropy = jax.lax.dynamic_update_slice_in_dim(
          entropy, jnp.where(done, 0.0, step_entropy(logits, sc.temperature))[:, None], i, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    if sc.eos_token_id is not None:
      done = done | (new == sc.eos_token_id)
    return i + 1, cache, new, tokens, logprobs, entropy, done, lengths, rng

  state = (jnp.int32(1), cache, token, tokens, logprobs, entropy, done, lengths, rng)
  _, _, _, tokens, logprobs, entropy, _, lengths, _ = jax.lax.while_loop(cond, body, state)
  mask = (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.float32)
  return Samples(tokens, mask, logprobs * mask, lengths,
                 entropy * mask if sc.entropy else None)


def left_pad(sequences, pad_token_id: int, length: Optional[int] = None):
  """Lists of token ids -> left-padded (tokens, segment_ids) int32 arrays of width `length`."""
  width = length or max(len(s) for s in sequences)
  tokens = np.full((len(sequences), width), pad_token_id, np.int32)
  seg = np.zeros((len(sequences), width), np.int32)
  for i, s in enumerate(sequences):
    if len(s) > width:
      raise UserError(f"prompt {i} has {len(s)} tokens, more than the width {width}")
    if s:
      tokens[i, width - len(s):] = s
      seg[i, width - len(s):] = 1
  return tokens, seg
