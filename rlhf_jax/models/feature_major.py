"""The sampler's one-token decode step in feature-major layout, for XLA:CPU.

A decode step multiplies a few rows (the batch) by every weight matrix. XLA:CPU picks its matmul
kernel from the operands' logical shapes: x (B, d) @ W (d, f) runs as a GEMM with B rows, which
at B = 8 reads GPT-2's MLP weights at about 5 GB/s on one core; W^T (f, d) @ x^T (d, B), the same
product with the weights stored output-major and the activations feature-major, runs at 8-9 GB/s
(`benchmarks/generate.py` has the end-to-end figures). So this step keeps the hidden state as
x^T (d_model, B) from the embedding to the LM head:

  per layer   h = norm(x^T) over axis 0
              [q; k; v]^T = Wqkv^T h (+ b)          (the three projections fused: one product)
              attention over the KV cache on (B, heads, head_dim), as `Transformer` does
              x^T += Wo^T out^T (+ b)
              h = norm(x^T);  [gate; up]^T = Wgu^T h (+ b)  (fused for Llama)
              x^T += Wdown^T act(.) (+ b)
  head        logits^T = E h (tied: the embedding is already output-major) or Wlm^T h

`transpose_params` builds those output-major, fused weights ONCE per `sampling.sample` call
(inside its jit, one pass over the weights), or once for many calls (`sampling.decode_weights`,
which `generate` runs at load); `decode_step` is the step. The KV cache, masks,
positions and every formula are the module's (`transformer.Transformer` with scan_layers False);
tests/test_sampling.py checks the logits and the new cache against it. Only the one-token step
without a mesh on CPU uses this (`use_feature_major`); prefill, training and scoring, other
backends (whose compilers choose layouts themselves), meshes of several devices and int8
decoding run the module.
"""
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models import transformer as tfm


def use_feature_major(params) -> bool:
  """Whether `sampling.sample` decodes with this step: on CPU, on one device (no mesh active, or
  a mesh of one device, as PPO on one CPU has), float weights (int8 decoding runs the module)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (tfm._platform() == "cpu" and (mesh.empty or mesh.size == 1)
          and params["embed"].dtype != jnp.int8)


def transpose_params(params, cfg: ModelConfig):
  """Decode weights from per-layer module params (`unstack_layers`): per layer 'qkv' ((h + 2k) *
  hd, d) and its bias, 'o' (d, h * hd), 'up' ((f or 2f), d) (Llama: [gate; up]), 'down' (d, f),
  the norms; 'head' (V, d): the tied embedding itself or the untied LM head transposed."""
  dt = jnp.dtype(cfg.dtype)
  # (in, out...) -> (out, in); the attention output projection is (heads, head_dim, d) -> (d, h*hd).
  out_major = lambda w, n_in: (w.reshape(w.shape[0], -1) if n_in == 1
                               else w.reshape(-1, w.shape[-1])).T
  layers = []
  for i in range(cfg.num_layers):
    p = params["layers"][str(i)]
    a, m = p["attn"], p["mlp"]
    layer = {
        "attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
        "qkv": jnp.concatenate([out_major(a[n]["kernel"], 1) for n in "qkv"], 0).astype(dt),
        "o": out_major(a["o"]["kernel"], 2).astype(dt),
        "up": jnp.concatenate([out_major(m[n]["kernel"], 1) for n in
                               (("gate", "up") if cfg.flavour == "llama" else ("up",))],
                              0).astype(dt),
        "down": out_major(m["down"]["kernel"], 1).astype(dt),
    }
    if cfg.flavour == "gpt2":   # biases, as (out, 1) columns
      layer["qkv_bias"] = jnp.concatenate([a[n]["bias"].reshape(-1) for n in "qkv"])[:, None]
      layer["o_bias"] = a["o"]["bias"][:, None]
      layer["up_bias"] = m["up"]["bias"][:, None]
      layer["down_bias"] = m["down"]["bias"][:, None]
    layers.append(layer)
  head = params["embed"] if cfg.tie_embeddings else params["lm_head"]["kernel"].T
  out = {"layers": layers, "final_norm": params["final_norm"], "embed": params["embed"],
         "head": head.astype(dt)}
  if cfg.flavour == "gpt2":
    out["pos_embed"] = params["pos_embed"]
  return out


def _norm(x, p, cfg: ModelConfig):
  """The model's norm (`transformer._norm`) of x^T (d, B) over axis 0."""
  bias = p["bias"][:, None] if cfg.flavour == "gpt2" else None
  return tfm._norm(x, p["scale"][:, None], bias, cfg.norm_eps, jnp.dtype(cfg.dtype), 0)


def _matmul(w, x, bias=None):
  y = w @ x.astype(w.dtype)
  return y if bias is None else y + bias.astype(y.dtype)


def decode_step(fm, cfg: ModelConfig, token: jax.Array, cache: dict):
  """(logits (B, V) float32 with padded ids masked, new cache) after feeding one token per row
  (B,) with segment id 1 into `cache` (`transformer.init_cache` with scan_layers False): what
  `Transformer(cfg).apply(params, token[:, None], cache=cache)` returns, at T = 1."""
  b = token.shape[0]
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  seg = jnp.ones((b, 1), jnp.int32)
  ctx = tfm._attention_context(cfg, seg, None, cache)
  x = jnp.take(fm["embed"], token, axis=0).astype(jnp.dtype(cfg.dtype))         # (B, d)
  if cfg.flavour == "gpt2":
    x = x + jnp.take(fm["pos_embed"], ctx["positions"][:, 0], axis=0).astype(x.dtype)
  x = x.T                                                                      # (d, B)
  new_k, new_v = [], []
  for i, p in enumerate(fm["layers"]):
    qkv = _matmul(p["qkv"], _norm(x, p["attn_norm"], cfg), p.get("qkv_bias"))
    qkv = qkv.T.reshape(b, 1, h + 2 * kv, hd)                                   # (B, 1, ., hd)
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:]
    if cfg.flavour == "llama":
      q = tfm.apply_rope(q, ctx["positions"], ctx["inv_freq"])
      k = tfm.apply_rope(k, ctx["positions"], ctx["inv_freq"])
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
        buf, new.astype(buf.dtype).transpose(0, 2, 1, 3), ctx["index"], axis=2)
    keys, values = write(cache["k"][i], k), write(cache["v"][i], v)
    new_k.append(keys)
    new_v.append(values)
    out = tfm._einsum_attention(q, keys, values.astype(v.dtype), ctx["mask"], "bksd", cfg, None)
    x = x + _matmul(p["o"], out.reshape(b, h * hd).T, p.get("o_bias"))
    up = _matmul(p["up"], _norm(x, p["mlp_norm"], cfg), p.get("up_bias"))
    hidden = tfm._gelu(up) if cfg.flavour == "gpt2" else tfm._swiglu(up[:cfg.d_ff], up[cfg.d_ff:])
    x = x + _matmul(p["down"], hidden, p.get("down_bias"))
  x = _norm(x, fm["final_norm"], cfg)
  # logits^T (V, B); the barrier keeps XLA from folding the transpose into the product (which
  # turns it back into the slow (B, d) x (d, V) kernel).
  logits = jax.lax.optimization_barrier(
      jnp.matmul(fm["head"], x.astype(fm["head"].dtype), preferred_element_type=jnp.float32)).T
  new_cache = {"k": tuple(new_k), "v": tuple(new_v), "segment_ids": ctx["segment_ids"],
               "index": ctx["index"] + 1, "pos": cache["pos"] + 1}
  return tfm.mask_padded_vocab(logits, cfg), new_cache
