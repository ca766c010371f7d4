"""Int8 decoding (opt-in): weights and activations quantized to int8 for the matmuls of the
sampler's decode steps (`sampling.decode_weights(..., dtype='int8')`), int32 accumulation.

On CPU, decoding at small batch streams every weight once per step; float32 matrix-vector
products reach about half of the machine's read bandwidth, and XLA does not fuse an int8 -> float
conversion into the matmul (weight-only int8 is slower than float32 here). An int8 x int8 -> int32
product reads a quarter of the bytes at the same speed per byte.

  weights (per output channel o, over the contracted axes i):
      s_o = max_i |W_io| / 127,    Wq_io = round(W_io / s_o)        (int8, computed once)
  activations (per row r, dynamic, every call):
      a_r = max_i |x_ri| / 127,    xq_ri = round(x_ri / a_r)
  y_ro = a_r * s_o * sum_i xq_ri Wq_io                                (int32 sum, exact)

so each product carries the rounding of both operands (relative error ~1/254 per factor, then
averaged over the contraction). Norms, biases, positions, attention over the KV cache, softmax and
sampling stay float32. The tied embedding is quantized per vocabulary row: the same scales serve
the token lookup (dequantized rows) and the LM head (one output channel per row).

Quantized parameters keep their tree: a Projection's 'kernel' becomes int8 with a float32
'kernel_scale' (shape: its output axes) beside it; 'embed' becomes int8 with 'embed_scale' (V,).
The model code (`transformer.Projection`, `transformer.Transformer`) switches on the int8 dtype.
"""
import jax
import jax.numpy as jnp

# Contracted (input) axes of each Projection's kernel, by module name: the attention output
# projection contracts (heads, head_dim), every other one its first axis.
_INPUT_AXES = {"o": 2}


def _symmetric(a: jax.Array, axes: tuple, keepdims: bool):
  """(int8 round(a / s), s) with s = max |a| / 127 over `axes` (1 where that max is 0)."""
  a = a.astype(jnp.float32)
  scale = jnp.max(jnp.abs(a), axis=axes, keepdims=keepdims) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  return jnp.round(a / (scale if keepdims else jnp.expand_dims(scale, axes))).astype(jnp.int8), scale


def quantize(w: jax.Array, n_in: int):
  """(int8 weights, float32 scales over the output axes) of w (in_axes + out_axes)."""
  return _symmetric(w, tuple(range(n_in)), keepdims=False)


def quantize_params(params):
  """A decode parameter tree (per-layer, `unstack_layers`) with every Projection kernel and the
  embedding in int8 plus their scales; everything else unchanged."""
  def walk(tree, name):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for key, value in tree.items():
      if key == "kernel" and not isinstance(value, dict) and name != "scalar_head":
        out["kernel"], out["kernel_scale"] = quantize(value, _INPUT_AXES.get(name, 1))
      else:
        out[key] = walk(value, key)
    return out
  out = walk(params, "")
  if "embed" in params:
    q, scale = quantize(params["embed"].T, 1)     # per vocabulary row
    out["embed"], out["embed_scale"] = q.T, scale
  return out


def _quantize_rows(x: jax.Array, n_in: int):
  """(int8 x, float32 per-row scales (..., 1 x n_in)) over x's last n_in axes."""
  return _symmetric(x, tuple(range(x.ndim - n_in, x.ndim)), keepdims=True)


def project(x: jax.Array, kernel: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
  """x @ kernel (contracting x's last n_in axes with kernel's first n_in) with kernel int8 and
  `scale` its per-output scales; float32 result."""
  xq, xs = _quantize_rows(x, n_in)
  acc = jax.lax.dot_general(xq, kernel, ((tuple(range(x.ndim - n_in, x.ndim)),
                                          tuple(range(n_in))), ((), ())),
                            preferred_element_type=jnp.int32)
  n_out = kernel.ndim - n_in
  xs = xs.reshape(xs.shape[:x.ndim - n_in] + (1,) * n_out)
  return acc.astype(jnp.float32) * xs * scale


def tied_logits(x: jax.Array, embed: jax.Array, scale: jax.Array) -> jax.Array:
  """Float32 logits x @ embed^T with embed (V, d) int8 and per-row scales (V,)."""
  xq, xs = _quantize_rows(x, 1)
  acc = jnp.einsum("btd,vd->btv", xq, embed, preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * xs * scale


def embed_lookup(embed: jax.Array, scale: jax.Array, tokens: jax.Array) -> jax.Array:
  """Float32 rows of the int8 embedding for `tokens`."""
  return jnp.take(embed, tokens, axis=0).astype(jnp.float32) * jnp.take(scale, tokens)[..., None]
