"""GGUF (llama.cpp) files -> our ModelConfig and parameters, dequantized to float32.

Reads with the `gguf` package (no torch). Llama-architecture files are supported (SmolLM2, Llama,
Mistral without sliding window). llama.cpp stores q/k projection rows permuted for its RoPE kernel;
`_unpermute` undoes it so the weights match the Hugging Face layout.
"""
import struct

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import ModelConfig

# GGUF tensor name (per layer or top level) -> Hugging Face Llama name.
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _reader(path):
  import gguf  # optional dependency: pip install rlhf_jax[gguf]
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as e:
    raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key, path, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise UserError(f"{path}: GGUF metadata {key!r} is missing")
  return field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (interleaved -> 'rotate half' rotary layout)."""
  d_out, d_in = w.shape
  return w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def config_from_gguf(reader, path: str) -> ModelConfig:
  arch = _field(reader, "general.architecture", path)
  if arch != "llama":
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (expected llama)")
  g = lambda key, default=None: _field(reader, f"llama.{key}", path, default)
  d, h = int(g("embedding_length")), int(g("attention.head_count"))
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = int(g("vocab_size", len(tokens.data) if tokens is not None else 0) or 0)
  names = {t.name for t in reader.tensors}
  eos = int(_field(reader, "tokenizer.ggml.eos_token_id", path, 2))
  return ModelConfig(
      flavour="llama", vocab_size=vocab, num_layers=int(g("block_count")), d_model=d, num_heads=h,
      num_kv_heads=int(g("attention.head_count_kv", h)),
      head_dim=int(g("attention.key_length", d // h)), d_ff=int(g("feed_forward_length")),
      max_len=int(g("context_length", 2048)),
      norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in names,
      bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", path, 1)), eos_token_id=eos,
      pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", path, eos)))


def read_gguf(path: str, expected_params_fn):
  """(ModelConfig, params) from a GGUF file. expected_params_fn(cfg) -> abstract param tree."""
  from rlhf_jax.models import lazy
  cfg, params = read_gguf_lazy(path, expected_params_fn)
  return cfg, lazy.materialize(params)


def read_gguf_lazy(path: str, expected_params_fn):
  """(ModelConfig, params as `lazy.LazyTensor`s): every name and shape is checked now, each tensor
  is dequantized only when a slice of it is first needed (`lazy.place` / `lazy.materialize`)."""
  from rlhf_jax.models.hf import lazy_params_from_hf
  reader = _reader(path)
  cfg = config_from_gguf(reader, path)
  tensors = {}
  for t in reader.tensors:
    if t.name.startswith("blk."):
      _, layer, rest = t.name.split(".", 2)
      if rest not in _LAYER_NAMES:
        raise UserError(f"{path}: tensor {t.name!r} is not part of a llama model")
      name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    elif t.name in _TOP_NAMES:
      name = _TOP_NAMES[t.name]
    elif t.name == "rope_freqs.weight":
      continue     # llama3 frequency factors; derived from the config instead
    else:
      raise UserError(f"{path}: tensor {t.name!r} is not part of a llama model")
    shape = tuple(int(s) for s in reversed(t.shape))       # GGUF lists dimensions innermost first
    if int(t.n_elements) != int(np.prod(shape)):
      raise UserError(f"{path}: tensor {t.name!r} holds {int(t.n_elements)} values, its header "
                      f"says {shape}")
    heads = (cfg.num_heads if t.name.endswith(".attn_q.weight") else
             cfg.num_kv_heads if t.name.endswith(".attn_k.weight") else None)
    tensors[name] = _deferred(path, t, shape, heads)
  return cfg, lazy_params_from_hf(cfg, tensors, path, expected_params_fn(cfg))


def _dequantize(path, t, shape, chunk_values: int = 1 << 16):
  """The tensor as float32 of `shape`, dequantized a few rows at a time (quantization blocks lie
  within rows), so the library's temporaries stay small next to the tensor itself."""
  import gguf
  data = t.data
  rows = int(data.shape[0]) if data.ndim == 2 and len(shape) == 2 else -1
  try:
    if rows != shape[0]:     # not one row of data per row of the tensor: all at once
      w = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)
      if w.size != int(np.prod(shape)):
        raise UserError(f"{path}: tensor {t.name!r} holds {w.size} values, its header says "
                        f"{shape}")
      return w.reshape(shape)
    out = np.empty(shape, np.float32)
    step = max(1, chunk_values // max(1, shape[1]))
    for r in range(0, rows, step):
      part = gguf.quants.dequantize(data[r:r + step], t.tensor_type)
      if part.size != min(step, rows - r) * shape[1]:
        raise UserError(f"{path}: tensor {t.name!r} holds {part.size} values in rows {r}.., its "
                        f"header says {shape}")
      out[r:r + step] = part.reshape(-1, shape[1])
    return out
  except (NotImplementedError, ValueError) as e:
    raise UserError(f"{path}: cannot dequantize tensor {t.name!r} "
                    f"({t.tensor_type.name}): {e}") from None


def _deferred(path, t, shape, heads):
  """The tensor `t`, dequantized to float32 (and un-permuted for q/k) when first needed."""
  from rlhf_jax.models.lazy import Deferred

  def load():
    w = _dequantize(path, t, shape)
    return w if heads is None else _unpermute(w, heads)
  return Deferred(shape, load)


def tokenizer_metadata(path: str) -> dict:
  """The tokenizer.* and general.architecture metadata of a GGUF file as plain Python values."""
  reader = _reader(path)
  return {key: field.contents() for key, field in reader.fields.items()
          if key.startswith("tokenizer.") or key == "general.architecture"}
