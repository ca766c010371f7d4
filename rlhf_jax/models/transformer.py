"""One decoder-only transformer (GPT-2 and Llama flavours) with an LM head or a scalar head.

The same module serves training (full forward, packed or padded rows, dropout), decoding (explicit
KV cache), the reward model and the value function (scalar head on the same backbone).

Inputs
  tokens       (B, T) int32.
  segment_ids  (B, T) int32: 0 marks padding, 1, 2, ... number the documents of a packed row.
               A token attends to earlier tokens of its own segment only. Default: all ones.
  positions    (B, T) int32: default = index of the token within its segment (so left padding and
               packing both get the positions a model sees on an unpadded sequence).
  cache        optional KV cache from `init_cache`: the call appends its T tokens at slot
               `cache['index']` and attends to everything cached before them.

Output: (out, new_cache); out is logits (B, T, vocab) for head='lm', a scalar per token (B, T)
for head='scalar', the final hidden states (B, T, d_model) for head='none' (T = 1 with
last_only=True). new_cache is None without a cache.

Parameters are stacked over layers (one `nn.scan`), so their leading axis is 'layers'. Every parameter
carries logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, layers); `rlhf_jax.sharding`
maps them to mesh axes. No mesh axis is named here.

Precision: matmul inputs and activations in `cfg.dtype`, parameters in `cfg.param_dtype`
(float32 master weights under bfloat16 compute); norms, RoPE, attention softmax, logits and the
scalar head in float32 whatever the dtype.

Attention (`cfg.attention_impl`, resolved per call by `attention_impl`): 'einsum' is the
reference (float32 scores); 'blocked' (`blocked_attention`, what 'auto', the default, picks on
CPU) computes causal query blocks and recomputes the probabilities in its backward pass instead of
keeping them; 'xla' and 'cudnn' go through
`jax.nn.dot_product_attention` with the same mask (cuDNN flash attention: causal in the kernel,
segments as a bias); 'splash' is the Pallas splash-attention kernel (TPU; causal and segment masks
in the kernel, no scores in HBM); 'auto' picks per backend. Where a fused kernel cannot take a call
it falls back (see `attention_impl`).

Rematerialisation (`cfg.remat`): a policy name of `REMAT_POLICIES` (config.py describes them).

Vocabulary padding (`cfg.vocab_multiple`): the embedding has `cfg.padded_vocab` rows (and an
untied LM head as many columns); the logits of ids >= vocab_size are _MASKED in every output
(`mask_padded_vocab`), so they have probability 0 in every softmax. `lm_head_logits` is the LM
head as a pure function (what chunked losses call); `resize_vocab` pads or strips the rows.
"""
import contextlib
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import blocked_attention
from rlhf_jax.models import int8
from rlhf_jax.models.config import ModelConfig

try:   # the Pallas TPU splash-attention kernel (attention_impl 'splash')
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash_kernels, splash_attention_mask as splash_masks)
except ImportError:   # a jax without Pallas' TPU ops: 'splash' falls back to 'xla'
  splash_kernels = splash_masks = None
try:   # jax's cuDNN attention module (private): its version check says whether cuDNN is there
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
except ImportError:
  cudnn_attention = None

HEADS = ("lm", "scalar", "none")
# Logical axes of one layer's KV-cache buffer (B, kv_heads, S, head_dim); `rlhf_jax.sharding`
# maps them (batch over the data axes, kv_heads over the tensor axis, the slots whole).
CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")
_MASKED = -1e30  # finite, so a fully masked (padding) query row gives uniform weights, not NaN

# cfg.remat -> what a layer saves for the backward pass (None: nothing, nn.remat's default).
# 'dots_saveable' keeps the weight matmuls' outputs (dots without batch dimensions: the q/k/v/o
# projections and the MLP), so the backward pass recomputes norms, attention and activations only.
REMAT_POLICIES = {
    "full": lambda: None,
    "dots_saveable": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}


def _dense_init(std):
  return nn.initializers.normal(stddev=std)


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dtype(name):
  return jnp.dtype(name)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Index of each token within its segment (0 at a segment's first token; 0 on padding)."""
  seg = segment_ids
  idx = jnp.arange(seg.shape[-1], dtype=jnp.int32)
  start = jnp.concatenate([jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], -1)
  seg_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=seg.ndim - 1)
  return jnp.where(seg != 0, idx - seg_start, 0).astype(jnp.int32)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies theta^(-2i/d), with Llama-3 long-context scaling when configured."""
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  if cfg.rope_scaling_factor:
    factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    low_wavelen = cfg.rope_original_max_len / lo
    high_wavelen = cfg.rope_original_max_len / hi
    wavelen = 2 * math.pi / inv
    smooth = (cfg.rope_original_max_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    inv = jnp.where(wavelen > low_wavelen, inv / factor,
                    jnp.where(wavelen < high_wavelen, inv, smoothed))
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, 'rotate half' convention (as Hugging Face Llama). x: (B, T, H, D)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq          # (B, T, D/2)
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class Norm(nn.Module):
  """LayerNorm (gpt2) or RMSNorm (llama), statistics in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    pdt = _dtype(cfg.param_dtype)
    scale = _param(self, "scale", nn.initializers.ones, (cfg.d_model,), ("embed",), pdt)
    bias = (_param(self, "bias", nn.initializers.zeros, (cfg.d_model,), ("embed",), pdt)
            if cfg.flavour == "gpt2" else None)
    return _norm(x, scale, bias, cfg.norm_eps, _dtype(cfg.dtype), -1)


@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5))
def _norm(x, scale, bias, eps, dtype, axis):
  """LayerNorm (with bias) or RMSNorm (bias None) over `axis` (the features; scale and bias
  broadcast against x), in float32. Checkpointed: the backward pass keeps x only and recomputes
  the statistics (elementwise work) instead of storing each intermediate (B, T, d) array
  autodiff would keep, which on CPU costs more in memory traffic."""
  xf = x.astype(jnp.float32)
  if bias is not None:
    mean = xf.mean(axis, keepdims=True)
    var = jnp.square(xf - mean).mean(axis, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  else:
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(axis, keepdims=True) + eps) * scale
  return y.astype(dtype)


@jax.checkpoint
def _gelu(x):
  """GELU (tanh approximation); checkpointed like `_norm`: the backward keeps only x."""
  return jax.nn.gelu(x, approximate=True)


@jax.checkpoint
def _swiglu(gate, up):
  """silu(gate) * up; checkpointed like `_norm`: the backward keeps only gate and up."""
  return jax.nn.silu(gate) * up


def _project(x, kernel, n_in: int, dtype: str):
  """x @ kernel in `dtype`, contracting the last n_in axes of x with the first n_in of kernel."""
  x = x.astype(_dtype(dtype))
  return jax.lax.dot_general(x, kernel.astype(x.dtype),
                             ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


class Projection(nn.Module):
  """y = x @ W (+ b) with W of shape in_shape + out_shape, contracting all of in_shape."""
  in_shape: tuple
  out_shape: tuple
  in_axes: tuple
  out_axes: tuple
  use_bias: bool
  std: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    pdt = _dtype(self.param_dtype)
    kernel = _param(self, "kernel", _dense_init(self.std), self.in_shape + self.out_shape,
                    self.in_axes + self.out_axes, pdt)
    if kernel.dtype == jnp.int8:   # int8 decoding (models/int8.py): kernel_scale beside it
      y = int8.project(x, kernel, self.get_variable("params", "kernel_scale"), len(self.in_shape))
    else:
      y = _project(x, kernel, len(self.in_shape), self.dtype)
    if self.use_bias:
      y = y + _param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_axes,
                     pdt).astype(y.dtype)
    return y


# ----------------------------------------------------------------------------- attention

_TARGET_PLATFORM = None   # set by `target_platform`


@contextlib.contextmanager
def target_platform(platform: str):
  """Resolve 'auto' and the kernels' fallbacks for `platform` ('cpu', 'gpu', 'tpu') while tracing
  inside, instead of for `jax.default_backend()`: to compile for a TPU topology from a CPU host."""
  global _TARGET_PLATFORM
  old, _TARGET_PLATFORM = _TARGET_PLATFORM, platform
  try:
    yield
  finally:
    _TARGET_PLATFORM = old


def _platform():
  return _TARGET_PLATFORM or jax.default_backend()


@functools.lru_cache(maxsize=None)
def _cudnn_available() -> bool:
  try:   # jax's own check (it raises without cuDNN); private, so any failure means "no"
    cudnn_attention.check_cudnn_version()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _splash_block(t: int) -> int:
  """The splash kernel's block size for sequence length t (a multiple of 128): the largest of 512,
  256, 128 dividing t."""
  return next(block for block in (512, 256, 128) if t % block == 0)


def attention_impl(cfg: ModelConfig, length: int, cached: bool, dropout: bool,
                   platform: Optional[str] = None) -> str:
  """The implementation one attention call uses: `cfg.attention_impl` with 'auto' resolved for
  `platform` (default: `target_platform` or `jax.default_backend()`) and these fallbacks:

    attention dropout in training          -> 'einsum' (the only one that drops probabilities)
    'auto' on CPU                          -> 'blocked'; on TPU 'splash'; on a CUDA GPU 'cudnn'
    'cudnn', 'splash' with the KV cache    -> 'xla' (the cache's (B, K, S, D) layout and moving
                                              causal offset are not theirs; one decode query reads
                                              the cache once either way)
    'blocked' with the KV cache            -> 'einsum' (no causal blocks to skip; the sampler's
                                              path, unchanged; also for queries on a suffix
                                              of the keys, `Block.query_from`)
    'cudnn' outside float16/bfloat16, head_dim % 8 or > 128, odd length           -> 'xla'
    'splash' when the length is not a multiple of 128 (its smallest block), or
    without jax's Pallas TPU ops                                                     -> 'xla'
  'splash' off TPU runs through the Pallas interpreter (slow; what the CPU tests run).
  """
  impl = cfg.attention_impl
  if impl == "einsum" or dropout:
    return "einsum"
  platform = platform or _platform()
  if impl == "auto":
    impl = ("blocked" if platform == "cpu" else "splash" if platform == "tpu" else
            "cudnn" if _cudnn_available() else "xla")
  if impl == "blocked" and cached:
    return "einsum"
  if impl in ("cudnn", "splash") and cached:
    return "xla"
  if impl == "cudnn" and (cfg.dtype not in ("bfloat16", "float16") or cfg.head_dim % 8
                          or cfg.head_dim > 128 or length % 2):
    return "xla"
  if impl == "splash" and (length % 128 or splash_kernels is None):
    return "xla"
  return impl


def _einsum_attention(q, keys, values, mask, layout, cfg, dropout):
  """The reference: float32 scores, masked, softmax, weighted sum. q (B, T, H, D) and keys/values
  in `layout` ('bskd' or the cache's 'bksd'); returns (B, T, kv_heads, groups, D)."""
  b, t = q.shape[:2]
  hd = cfg.head_dim
  q = q.reshape(b, t, cfg.num_kv_heads, cfg.num_groups, hd) * (hd ** -0.5)
  scores = jnp.einsum(f"btkgd,{layout}->bkgts", q, keys.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum(f"bkgts,{layout}->btkgd", probs.astype(values.dtype), values)


def _splash_attention(q, k, v, q_seg, kv_seg, interpret):
  """Causal attention within segments through the Pallas splash kernel: q (B, T, H, D), already
  scaled; k, v (B, S, K, D); segment ids (B, T), (B, S). A token attends to earlier tokens of
  the same segment id (padding, id 0, to earlier padding: its output is never used).

  Under a mesh (`jax.set_mesh`, as `sharding.activate` sets it) the kernel runs per shard in a
  `shard_map`: batch over the logical 'batch' axis, heads over 'heads' when the mesh axes divide
  both head counts, the sequence whole."""
  kernels, masks = splash_kernels, splash_masks
  t, s = q.shape[1], k.shape[1]

  def local(q, k, v, q_seg, kv_seg):
    mask = masks.MultiHeadMask([masks.CausalMask((t, s))] * q.shape[2])
    bq, bkv = _splash_block(t), _splash_block(s)
    blocks = kernels.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                                block_kv_dq=bkv)
    kernel = kernels.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                     interpret=interpret)
    out = jax.vmap(kernel)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                           segment_ids=kernels.SegmentIds(q_seg, kv_seg))
    return out.swapaxes(1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, q_seg, kv_seg)
  batch = "batch" if _divides("batch", q.shape[0], mesh) else None
  heads = ("heads" if _divides("heads", q.shape[2], mesh) and _divides("kv_heads", k.shape[2], mesh)
           else None)
  spec4 = nn.logical_to_mesh_axes((batch, None, heads, None))
  spec2 = nn.logical_to_mesh_axes((batch, None))
  return jax.shard_map(local, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2, spec2),
                       out_specs=spec4, check_vma=False)(q, k, v, q_seg, kv_seg)


def _divides(logical: str, size: int, mesh) -> bool:
  """Whether the mesh axes that the active logical-axis rules give `logical` divide `size`."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return size % math.prod(mesh.shape[a] for a in names) == 0


def _fused_attention(impl, q, keys, values, ctx, layout, cfg, cached):
  """`impl` ('xla', 'cudnn', 'splash') attention: q (B, T, H, D) unscaled, keys/values in `layout`;
  returns (B, T, H, D)."""
  if layout == "bksd":   # the cache: (B, K, S, D) -> (B, S, K, D)
    keys, values = keys.swapaxes(1, 2), values.swapaxes(1, 2)
  keys, values = keys.astype(q.dtype), values.astype(q.dtype)
  scale = cfg.head_dim ** -0.5
  if impl == "splash":
    seg = ctx["segment_ids"]
    return _splash_attention(q * jnp.asarray(scale, q.dtype), keys, values, seg, seg,
                             interpret=_platform() != "tpu")
  return jax.nn.dot_product_attention(q, keys, values, mask=ctx["mask"][:, None], scale=scale,
                                      is_causal=impl == "cudnn" and not cached,
                                      implementation=impl)


class Attention(nn.Module):
  cfg: ModelConfig

  def _proj(self, name, in_shape, out_shape, in_axes, out_axes, std):
    cfg = self.cfg
    return Projection(in_shape, out_shape, in_axes, out_axes, cfg.flavour == "gpt2", std,
                      cfg.dtype, cfg.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, ctx, layer_cache, deterministic, query_from: int = 0):
    """Queries from positions >= query_from only (keys and values from all of x): the output is
    (B, T - query_from, d_model), the attention of those positions (see `Block.query_from`)."""
    cfg = self.cfg
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std = 0.02
    if query_from:
      ctx = dict(ctx, mask=ctx["mask"][:, query_from:])
    q = self._proj("q", (d,), (h, hd), ("embed",), ("heads", "head_dim"), std)(x[:, query_from:])
    k = self._proj("k", (d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), std)(x)
    v = self._proj("v", (d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), std)(x)
    if cfg.flavour == "llama":
      q = apply_rope(q, ctx["positions"][:, query_from:], ctx["inv_freq"])
      k = apply_rope(k, ctx["positions"], ctx["inv_freq"])

    b, t = q.shape[:2]
    if layer_cache is None:
      keys, values, new_kv, layout = k, v, None, "bskd"
    else:
      # Write the new keys/values into this layer's cache buffer first, then attend over the whole
      # buffer (slots are masked by ctx['mask']). Nothing reads the old buffer after the write, so
      # XLA updates it in place inside the decode loop.
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
          buf, new.astype(buf.dtype).transpose(0, 2, 1, 3), ctx["index"], axis=2)
      keys, values = (nn.with_logical_constraint(write(layer_cache[n], new), CACHE_AXES)
                      for n, new in (("k", k), ("v", v)))
      new_kv, layout = {"k": keys, "v": values}, "bksd"
    dropout = bool(cfg.dropout_attn) and not deterministic
    # Queries on a suffix of the keys attend like the cache's (a rectangular mask).
    impl = attention_impl(cfg, t, cached=layer_cache is not None or query_from > 0,
                          dropout=dropout)
    if impl == "blocked":
      out = blocked_attention.blocked_attention(
          q.reshape(b, t, kv, h // kv, hd), keys, values, ctx["mask"],
          blocked_attention.default_block(t))
    elif impl == "einsum":
      drop = nn.Dropout(cfg.dropout_attn) if dropout else None
      out = _einsum_attention(q, keys, values.astype(v.dtype), ctx["mask"], layout, cfg,
                              None if drop is None else functools.partial(drop,
                                                                          deterministic=False))
    else:
      out = _fused_attention(impl, q, keys, values, ctx, layout, cfg, layer_cache is not None)
    out = out.reshape(b, t, h, hd)
    out = self._proj("o", (h, hd), (d,), ("heads", "head_dim"), ("embed",),
                     std / math.sqrt(2 * cfg.num_layers))(out)
    return out, new_kv


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    bias = cfg.flavour == "gpt2"
    proj = functools.partial(Projection, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    up = proj((cfg.d_model,), (cfg.d_ff,), ("embed",), ("mlp",), std=0.02, name="up")(x)
    if cfg.flavour == "gpt2":
      hidden = _gelu(up)
    else:
      gate = proj((cfg.d_model,), (cfg.d_ff,), ("embed",), ("mlp",), std=0.02, name="gate")(x)
      hidden = _swiglu(gate, up)
    return proj((cfg.d_ff,), (cfg.d_model,), ("mlp",), ("embed",),
                std=0.02 / math.sqrt(2 * cfg.num_layers), name="down")(hidden)


class Block(nn.Module):
  """Pre-norm residual block; scanned over layers. Carry: hidden states; per layer: cache slice.

  query_from > 0: the block's output at positions >= query_from only, (B, T - query_from, d):
  keys and values (and the cache) from every position, queries, the attention output and the
  MLP from those positions alone. The last layer of an unrolled stack runs so when the head
  reads a suffix (`Transformer`'s head_from, last_only): nothing after it reads the others."""
  cfg: ModelConfig
  deterministic: bool = True
  query_from: int = 0

  @nn.compact
  def __call__(self, x, layer_cache, ctx):
    cfg = self.cfg
    drop = lambda y: (nn.Dropout(cfg.dropout_resid)(y, deterministic=False)
                      if cfg.dropout_resid and not self.deterministic else y)
    attn, new_kv = Attention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), ctx, layer_cache,
                                                self.deterministic, self.query_from)
    x = x[:, self.query_from:] + drop(attn)
    x = x + drop(Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x)))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed_act"))
    return x, new_kv


class _Unrolled(nn.Module):
  """The layers one by one, each with its own parameters (cfg.scan_layers=False).

  Same Block, same function as the scan; parameters are {'0': ..., '1': ...} instead of stacked,
  and the cache holds one buffer per layer. Decoding uses this: no per-step slicing of stacked
  weights or caches (see `unstack_layers`).
  """
  cfg: ModelConfig
  block: type
  deterministic: bool
  query_from: int = 0   # the last layer's (`Block.query_from`)

  @nn.compact
  def __call__(self, x, layer_caches, ctx):
    new = []
    n = self.cfg.num_layers
    for i in range(n):
      layer_cache = (None if layer_caches is None else
                     {"k": layer_caches["k"][i], "v": layer_caches["v"][i]})
      x, kv = self.block(self.cfg, self.deterministic, self.query_from if i == n - 1 else 0,
                         name=str(i))(x, layer_cache, ctx)
      new.append(kv)
    if layer_caches is None:
      return x, None
    return x, {"k": tuple(kv["k"] for kv in new), "v": tuple(kv["v"] for kv in new)}


def unstack_layers(params):
  """Stacked (scanned) parameters -> per-layer parameters for cfg.replace(scan_layers=False).
  Differentiable: the gradient of the per-layer parameters is stacked back in one concatenation
  (`_split_layers`), not summed from one zero-padded copy per layer."""
  return dict(params, layers={str(i): layer for i, layer in enumerate(_split_layers(
      params["layers"]))})


@jax.custom_vjp
def _split_layers(layers):
  """A pytree of stacked (L, ...) arrays -> a tuple of L per-layer pytrees."""
  n = jax.tree.leaves(layers)[0].shape[0]
  return tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n))


def _split_layers_fwd(layers):
  return _split_layers(layers), None


def _split_layers_bwd(_, per_layer):
  return (jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer),)


_split_layers.defvjp(_split_layers_fwd, _split_layers_bwd)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> dict:
  """An empty KV cache for `max_len` slots: keys/values (layers, B, kv_heads, S, head_dim)
  (a tuple of per-layer (B, kv_heads, S, head_dim) buffers when cfg.scan_layers is False).

  The slot axis sits next to head_dim so attention reads the cache with no transpose.

  The buffers carry the logical axes CACHE_AXES (sharded as `rlhf_jax.sharding`'s rules say when
  traced under `sharding.activate`).

  index: next slot to write (shared by the batch); segment_ids (B, S): 0 on empty or padding slots;
  pos (B,): number of real tokens seen per row, so new tokens get the right positions.
  """
  shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
  buffer = lambda: nn.with_logical_constraint(jnp.zeros(shape, _dtype(cfg.dtype)), CACHE_AXES)
  if cfg.scan_layers:
    zeros = lambda: nn.with_logical_constraint(
        jnp.zeros((cfg.num_layers,) + shape, _dtype(cfg.dtype)), ("layers",) + CACHE_AXES)
  else:   # one buffer per layer
    zeros = lambda: tuple(buffer() for _ in range(cfg.num_layers))
  return {"k": zeros(), "v": zeros(),
          "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
          "index": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch_size,), jnp.int32)}


def _attention_context(cfg, segment_ids, positions, cache):
  """Masks and positions shared by all layers (computed once, broadcast through the layer scan)."""
  t = segment_ids.shape[1]
  if cache is None:
    q_slot, k_slot, k_seg = jnp.arange(t), jnp.arange(t), segment_ids
    ctx = {"segment_ids": segment_ids} if cfg.attention_impl in ("splash", "auto") else {}
  else:   # keys are the cache's slots, this call's tokens written at index .. index + t - 1
    index = cache["index"]
    q_slot, k_slot = index + jnp.arange(t), jnp.arange(cache["segment_ids"].shape[1])
    k_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                index, axis=1)
    ctx = {"index": index, "segment_ids": k_seg}
    if positions is None:
      real = (segment_ids != 0).astype(jnp.int32)
      positions = jnp.maximum(cache["pos"][:, None] + jnp.cumsum(real, axis=1) - 1, 0)
  causal = k_slot[None, :] <= q_slot[:, None]
  same_seg = segment_ids[:, :, None] == k_seg[:, None, :]
  ctx["mask"] = causal[None] & same_seg & (k_seg != 0)[:, None, :]        # (B, T, S)
  if positions is None:
    positions = segment_positions(segment_ids)
  ctx["positions"] = positions.astype(jnp.int32)
  if cfg.flavour == "llama":
    ctx["inv_freq"] = rope_frequencies(cfg)
  return ctx


class Transformer(nn.Module):
  cfg: ModelConfig
  head: str = "lm"

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, cache: Optional[dict] = None, *,
               deterministic: bool = True, last_only: bool = False, head_from: int = 0):
    cfg = self.cfg
    if self.head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
    pdt = _dtype(cfg.param_dtype)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    ctx = _attention_context(cfg, segment_ids, positions, cache)

    embedding = _param(self, "embed", _dense_init(0.02), (cfg.padded_vocab, cfg.d_model),
                       ("vocab", "embed"), pdt)
    quantized = embedding.dtype == jnp.int8   # int8 decoding (models/int8.py)
    if quantized:
      embed_scale = self.get_variable("params", "embed_scale")
      x = int8.embed_lookup(embedding, embed_scale, tokens).astype(_dtype(cfg.dtype))
    else:
      x = jnp.take(embedding, tokens, axis=0).astype(_dtype(cfg.dtype))
    if cfg.flavour == "gpt2":
      pos_embedding = _param(self, "pos_embed", _dense_init(0.01), (cfg.max_len, cfg.d_model),
                             (None, "embed"), pdt)
      x = x + jnp.take(pos_embedding, ctx["positions"], axis=0).astype(x.dtype)
    if cfg.dropout_resid and not deterministic:
      x = nn.Dropout(cfg.dropout_resid)(x, deterministic=False)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat]())
    layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    # The head reads positions >= head_from (or the last one): with unrolled layers the last one
    # computes only those (`Block.query_from`); the scan runs every layer alike and slices after.
    suffix = tokens.shape[1] - 1 if last_only else head_from
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True}, in_axes=(0, nn.broadcast),
                       length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_kv = layers(cfg, deterministic, name="layers")(x, layer_caches, ctx)
    else:
      x, new_kv = _Unrolled(cfg, block, deterministic, suffix, name="layers")(x, layer_caches,
                                                                             ctx)
      suffix = 0   # (the last layer returned those positions only)
    x = Norm(cfg, name="final_norm")(x)

    new_cache = None
    if cache is not None:
      new_cache = {
          "k": new_kv["k"], "v": new_kv["v"], "segment_ids": ctx["segment_ids"],
          "index": ctx["index"] + tokens.shape[1],
          "pos": cache["pos"] + (segment_ids != 0).sum(axis=1).astype(jnp.int32),
      }

    # the head at positions >= head_from only (PPO scores the response alone), or at the last
    # position (a sampler's prefill needs nothing else)
    x = x[:, suffix:]
    if self.head == "none":
      return x, new_cache
    if self.head == "scalar":
      std = 1.0 / math.sqrt(cfg.d_model + 1)
      out = Projection((cfg.d_model,), (1,), ("embed",), (None,), True, std, "float32",
                       cfg.param_dtype, name="scalar_head")(x)
      return out[..., 0], new_cache
    if cfg.tie_embeddings:
      logits = int8.tied_logits(x, embedding, embed_scale) if quantized else _tied_logits(
          x, embedding)
    else:
      logits = Projection((cfg.d_model,), (cfg.padded_vocab,), ("embed",), ("vocab",), False, 0.02,
                          cfg.dtype, cfg.param_dtype, name="lm_head")(x).astype(jnp.float32)
    return mask_padded_vocab(logits, cfg), new_cache


def _tied_logits(x, embedding):
  """Float32 logits x @ embedding^T (the tied LM head)."""
  return jnp.einsum("btd,vd->btv", x, embedding.astype(x.dtype),
                    preferred_element_type=jnp.float32)


def mask_padded_vocab(logits: jax.Array, cfg: ModelConfig) -> jax.Array:
  """logits (..., padded_vocab) with the padded ids (>= cfg.vocab_size) set to _MASKED: after any
  softmax or log-softmax (at any temperature) their probability is exactly 0, so no sampler,
  greedy argmax, loss or log-prob can pick them. The identity without padding."""
  if cfg.padded_vocab == cfg.vocab_size:
    return logits
  real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
  return jnp.where(real, logits, jnp.asarray(_MASKED, logits.dtype))


def lm_head_logits(cfg: ModelConfig, params, x: jax.Array) -> jax.Array:
  """The LM head of `Transformer(cfg)` on final hidden states x (B, T, d_model) (the output of
  head='none'), as a pure function of the parameters: the same float32 logits (padded ids
  masked) as head='lm'. What chunked losses call on a few positions at a time."""
  if cfg.tie_embeddings:
    logits = _tied_logits(x, params["embed"])
  else:
    logits = _project(x, params["lm_head"]["kernel"], 1, cfg.dtype).astype(jnp.float32)
  return mask_padded_vocab(logits, cfg)


def resize_vocab(params, cfg: ModelConfig, rows: int):
  """`params` of `cfg` with the embedding rows (and untied LM-head columns) cut or zero-padded to
  `rows`: from a checkpoint of the real vocabulary into a padded model (rows = padded_vocab), or
  padding stripped for export (rows = vocab_size). Rows >= vocab_size are never used (their
  logits are masked), so either way the network computes the same function. numpy or jax
  arrays; other parameters are returned as they are."""
  def fit(x, axis):
    have = x.shape[axis]
    if have == rows:
      return x
    if have > rows:
      return x[:rows] if axis == 0 else x[:, :rows]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, rows - have)
    return (np if isinstance(x, np.ndarray) else jnp).pad(x, widths)
  out = dict(params, embed=fit(params["embed"], 0))
  if "lm_head" in params:
    out["lm_head"] = dict(params["lm_head"], kernel=fit(params["lm_head"]["kernel"], 1))
  return out
