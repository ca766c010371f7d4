"""Hugging Face format: config.json and safetensors tensors <-> our ModelConfig and parameter tree.

Families: GPT-2 (`model_type: gpt2`) and Llama (`llama`, and `mistral` without sliding window).
Tensors are read with a small safetensors reader of our own (numpy + memory map, bf16 via ml_dtypes)
that validates the header against the file size, so truncated or corrupt files give a clear error.
Nothing is ever unpickled: `pytorch_model.bin` checkpoints are refused.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import resize_vocab

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ----------------------------------------------------------------------------- safetensors files

def read_safetensors(path: str) -> dict:
  """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 * 2**20:
      raise UserError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                      f"file of {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: corrupt safetensors file (header is not a JSON object)")
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0,
                                                                                                 np.uint8)
  out = {}
  for name, info in header.items():
    try:
      dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise UserError(f"{path}: tensor {name!r} has an unsupported or corrupt header entry "
                      f"{info!r}") from None
    if end > data.size or end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
      raise UserError(f"{path}: truncated or corrupt safetensors file (tensor {name!r} needs bytes "
                      f"{begin}..{end} of {data.size})")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def read_hf_tensors(path: str) -> dict:
  """Tensors of a Hugging Face model directory (single file or sharded with an index)."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    return read_safetensors(single)
  if os.path.exists(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError):
      raise UserError(f"{index}: corrupt index (expected a JSON object with a 'weight_map')") from None
    tensors = {}
    for name in files:
      shard = os.path.join(path, name)
      if not os.path.exists(shard):
        raise UserError(f"{index}: names shard {name!r}, which does not exist")
      tensors.update(read_safetensors(shard))
    return tensors
  if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
    raise UserError(f"{path}: only pickle (.bin/.pt) weights found; rlhf_jax never unpickles files. "
                    "Re-save the model with safetensors (save_pretrained(..., safe_serialization=True))")
  raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


# ----------------------------------------------------------------------------- config.json

def _rope_settings(hf: dict) -> dict:
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  rope.update({k: v for k, v in scaling.items() if k not in rope})
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  out = {"rope_theta": float(theta)}
  if kind == "llama3":
    out.update(rope_scaling_factor=float(rope["factor"]),
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]),
               rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif kind != "default":
    raise UserError(f"config.json: rope type {kind!r} is not supported (expected default or llama3)")
  return out


def _token_id(value, default):
  if isinstance(value, list):
    value = value[0] if value else None
  return default if value is None else int(value)


def config_from_hf(hf: dict, where: str) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict; unsupported variants are rejected by name."""
  model_type = hf.get("model_type")
  try:
    if model_type == "gpt2":
      act = hf.get("activation_function", "gelu_new")
      if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation_function {act!r} is not supported (expected gelu_new)")
      if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise UserError(f"{where}: only standard 1/sqrt(head_dim) attention scaling is supported")
      d, h = int(hf["n_embd"]), int(hf["n_head"])
      eos = _token_id(hf.get("eos_token_id"), 50256)
      return ModelConfig(
          flavour="gpt2", vocab_size=int(hf["vocab_size"]), num_layers=int(hf["n_layer"]),
          d_model=d, num_heads=h, num_kv_heads=h, head_dim=d // h, d_ff=int(hf.get("n_inner") or 4 * d),
          max_len=int(hf["n_positions"]), norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
          tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
          bos_token_id=_token_id(hf.get("bos_token_id"), eos), eos_token_id=eos,
          pad_token_id=_token_id(hf.get("pad_token_id"), eos))
    if model_type in ("llama", "mistral"):
      if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{where}: attention_bias/mlp_bias are not supported for {model_type}")
      if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (expected silu)")
      if model_type == "mistral" and hf.get("sliding_window"):
        raise UserError(f"{where}: sliding_window attention is not supported")
      d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
      eos = _token_id(hf.get("eos_token_id"), 2)
      return ModelConfig(
          flavour="llama", vocab_size=int(hf["vocab_size"]), num_layers=int(hf["num_hidden_layers"]),
          d_model=d, num_heads=h, num_kv_heads=int(hf.get("num_key_value_heads") or h),
          head_dim=int(hf.get("head_dim") or d // h), d_ff=int(hf["intermediate_size"]),
          max_len=int(hf.get("max_position_embeddings", 2048)),
          norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
          bos_token_id=_token_id(hf.get("bos_token_id"), 1), eos_token_id=eos,
          pad_token_id=_token_id(hf.get("pad_token_id"), eos), **_rope_settings(hf))
  except KeyError as e:
    raise UserError(f"{where}: missing field {e.args[0]!r} for model_type {model_type!r}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{where}: bad value ({e})") from None
  raise UserError(f"{where}: model_type {model_type!r} is not supported "
                  "(expected gpt2, llama or mistral)")


def config_to_hf(cfg: ModelConfig) -> dict:
  """A config.json dict that transformers loads into the same network."""
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id, dtype="float32")
  if cfg.flavour == "gpt2":
    return dict(common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model,
                n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
                n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new", resid_pdrop=cfg.dropout_resid,
                embd_pdrop=cfg.dropout_resid, attn_pdrop=cfg.dropout_attn,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor:
    rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return dict(common, model_type="llama", architectures=["LlamaForCausalLM"],
              hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
              rope_parameters=rope, hidden_act="silu", attention_bias=False, mlp_bias=False,
              attention_dropout=cfg.dropout_attn)


# ----------------------------------------------------------------------------- tensor names

def _layer_tensors(cfg: ModelConfig):
  """(our path under 'layers', HF name suffix in layer i, our-shape -> HF-shape, HF -> ours).

  Our kernels are (in..., out...) and stacked over layers; HF Linear weights are (out, in);
  GPT-2's Conv1D weights are (in, out). GPT-2's fused q/k/v (c_attn) is handled in the callers.
  """
  d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  if cfg.flavour == "llama":
    lin = lambda in_shape, out_shape: (
        lambda w: w.reshape(int(np.prod(in_shape)), -1).T,            # ours -> HF (out, in)
        lambda w: w.T.reshape(in_shape + out_shape))                  # HF -> ours
    return [
        (("attn", "q", "kernel"), "self_attn.q_proj.weight", *lin((d,), (h, hd))),
        (("attn", "k", "kernel"), "self_attn.k_proj.weight", *lin((d,), (kv, hd))),
        (("attn", "v", "kernel"), "self_attn.v_proj.weight", *lin((d,), (kv, hd))),
        (("attn", "o", "kernel"), "self_attn.o_proj.weight", *lin((h, hd), (d,))),
        (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", *lin((d,), (f,))),
        (("mlp", "up", "kernel"), "mlp.up_proj.weight", *lin((d,), (f,))),
        (("mlp", "down", "kernel"), "mlp.down_proj.weight", *lin((f,), (d,))),
        (("attn_norm", "scale"), "input_layernorm.weight", None, None),
        (("mlp_norm", "scale"), "post_attention_layernorm.weight", None, None),
    ]
  conv = lambda in_shape, out_shape: (
      lambda w: w.reshape(int(np.prod(in_shape)), -1),                # ours -> HF (in, out)
      lambda w: w.reshape(in_shape + out_shape))
  flat = lambda shape: (lambda b: b.reshape(-1), lambda b: b.reshape(shape))
  return [
      (("attn", "o", "kernel"), "attn.c_proj.weight", *conv((h, hd), (d,))),
      (("attn", "o", "bias"), "attn.c_proj.bias", None, None),
      (("mlp", "up", "kernel"), "mlp.c_fc.weight", *conv((d,), (f,))),
      (("mlp", "up", "bias"), "mlp.c_fc.bias", None, None),
      (("mlp", "down", "kernel"), "mlp.c_proj.weight", *conv((f,), (d,))),
      (("mlp", "down", "bias"), "mlp.c_proj.bias", None, None),
      (("attn_norm", "scale"), "ln_1.weight", None, None),
      (("attn_norm", "bias"), "ln_1.bias", None, None),
      (("mlp_norm", "scale"), "ln_2.weight", None, None),
      (("mlp_norm", "bias"), "ln_2.bias", None, None),
  ] + [((("attn", n, "kernel")), None, *conv((d,), (h, hd))) for n in "qkv"] + [
      ((("attn", n, "bias")), None, *flat((h, hd))) for n in "qkv"]


def _top_names(cfg: ModelConfig):
  """Our top-level param -> HF name (model prefix included)."""
  if cfg.flavour == "llama":
    names = {("embed",): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight"}
    if not cfg.tie_embeddings:
      names[("lm_head", "kernel")] = "lm_head.weight"
    return names
  return {("embed",): "transformer.wte.weight", ("pos_embed",): "transformer.wpe.weight",
          ("final_norm", "scale"): "transformer.ln_f.weight",
          ("final_norm", "bias"): "transformer.ln_f.bias"}


def _layer_prefix(cfg, i):
  return f"model.layers.{i}." if cfg.flavour == "llama" else f"transformer.h.{i}."


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(cfg: ModelConfig, tensors: dict, where: str, expected_params) -> dict:
  """Our parameter tree (float32 numpy) from HF-named tensors; every shape is checked.

  expected_params: the abstract parameter tree of `cfg` (shapes to check against).
  """
  from rlhf_jax.models import lazy
  return lazy.materialize(lazy_params_from_hf(cfg, tensors, where, expected_params))


def lazy_params_from_hf(cfg: ModelConfig, tensors: dict, where: str, expected_params) -> dict:
  """`params_from_hf` with `lazy.LazyTensor` leaves: nothing is read yet, every shape is checked.

  tensors: HF name -> numpy array (a memory-mapped view: slices read only their pages) or
  `lazy.Deferred` (computed when first needed). `lazy.place` puts the tree onto a mesh one slice
  at a time, `lazy.materialize` reads it whole.
  """
  from rlhf_jax.models.lazy import LazyTensor, Part
  tensors = dict(tensors)
  if cfg.flavour == "gpt2":   # checkpoints saved from GPT2Model have no 'transformer.' prefix
    tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
               for k, v in tensors.items()}
  used = set()

  def take(name):
    if name not in tensors:
      raise UserError(f"{where}: missing tensor {name!r} (expected by config.json)")
    used.add(name)
    return tensors[name]

  def shape_of(raw):
    return tuple(int(s) for s in raw.shape)

  def check(path, part, name):
    want = tuple(_get(expected_params, path).shape)
    if part.shape != want:
      raise UserError(f"{where}: tensor {name!r} has shape {part.shape}, config.json implies "
                      f"{want}")
    return LazyTensor([part], stacked=False)

  params = {}
  for path, name in _top_names(cfg).items():
    raw = take(name)
    part = Part(raw, (lambda w: w.T) if path == ("lm_head", "kernel") else None)  # HF (vocab, d)
    _set(params, path, check(path, part, name))

  d = cfg.d_model
  per_layer = {}
  for i in range(cfg.num_layers):
    prefix = _layer_prefix(cfg, i)
    if cfg.flavour == "gpt2":
      w, b = take(prefix + "attn.c_attn.weight"), take(prefix + "attn.c_attn.bias")
      if shape_of(w) != (d, 3 * d) or shape_of(b) != (3 * d,):
        raise UserError(f"{where}: tensor {prefix + 'attn.c_attn.weight'!r} has shape "
                        f"{shape_of(w)}, config.json implies {(d, 3 * d)}")
      cols = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}
    for path, suffix, _, from_hf in _layer_tensors(cfg):
      if suffix is None:     # GPT-2 q/k/v, sliced out of c_attn (a view)
        kernel = path[2] == "kernel"
        raw = w if kernel else b
        name = prefix + "attn.c_attn." + ("weight" if kernel else "bias")
        col = cols[path[1]]
        transform = ((lambda x, col=col, f=from_hf: f(x[:, col])) if kernel else
                     (lambda x, col=col, f=from_hf: f(x[col])))
      else:
        name = prefix + suffix
        raw = take(name)
        transform = from_hf
      want = tuple(_get(expected_params, ("layers",) + path).shape[1:])
      try:
        part = Part(raw, transform)
      except ValueError:
        part = Part(raw)
      if part.shape != want:
        raise UserError(f"{where}: tensor {name!r} has shape {shape_of(raw)}, which does not fit "
                        f"config.json (expected {want} in our layout)")
      per_layer.setdefault(path, []).append(part)
  for path, parts in per_layer.items():
    _set(params, ("layers",) + path, LazyTensor(parts, stacked=True))

  unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                  and not (k == "lm_head.weight" and cfg.tie_embeddings))
  if unused:
    raise UserError(f"{where}: {len(unused)} tensor(s) this architecture does not use, e.g. "
                    f"{unused[0]!r} (is config.json for this checkpoint?)")
  return params


def params_to_hf(cfg: ModelConfig, params) -> dict:
  """HF-named numpy tensors from our parameter tree (the inverse of `params_from_hf`); the
  vocabulary padding (`vocab_multiple`) is stripped: HF tensors have vocab_size rows."""
  params = resize_vocab(params, cfg, cfg.vocab_size)
  out = {}
  for path, name in _top_names(cfg).items():
    value = np.asarray(_get(params, path))
    out[name] = value.T if path == ("lm_head", "kernel") else value
  for i in range(cfg.num_layers):
    prefix = _layer_prefix(cfg, i)
    fused = {}
    for path, suffix, to_hf, _ in _layer_tensors(cfg):
      value = np.asarray(_get(params, ("layers",) + path)[i])
      value = to_hf(value) if to_hf else value
      if suffix is None:
        fused[path[1:]] = value
      else:
        out[prefix + suffix] = value
    if fused:
      out[prefix + "attn.c_attn.weight"] = np.concatenate(
          [fused[(n, "kernel")] for n in "qkv"], axis=1)
      out[prefix + "attn.c_attn.bias"] = np.concatenate([fused[(n, "bias")] for n in "qkv"])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
