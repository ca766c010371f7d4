"""Reward and value models as Hugging Face sequence classifiers, out and in.

Out: a scalar-head model becomes a `GPT2ForSequenceClassification` / `LlamaForSequenceClassification`
directory: config.json (num_labels 1, a pad_token_id HF can find the last real token with),
model.safetensors (the backbone under HF's names plus `score.weight`), the tokenizer (its pad
token set to that id). In: such a directory (ours or anyone's, e.g. a TRL reward model) becomes
our parameters with a scalar head; `rlhf_jax.convert.load_model` dispatches here, so PPO's
`reward_model=` / `value_from=` take it as they take our own model directories.

Which token is scored. Ours: the scalar head at a row's last real token (segment ids mark
padding). HF's: `logits[b, i]` with i the rightmost column whose input id is not
`config.pad_token_id`, so left- and right-padded batches both work, provided the pad id never
occurs as a real token. Our tokenizers often pad with EOS (SmolLM2 does), and a scored sequence
ends with EOS, so the exported pad id is one no document contains (`export_pad_id`).
Left padding also shifts HF's positions unless `position_ids` are passed: GPT-2 (learned
positions) needs `position_ids = max(cumsum(attention_mask) - 1, 0)`; Llama (RoPE, relative)
gives the same scores with or without them.

The head's bias. HF's `score` is a Linear without bias; our head is `w . h + b`.
  GPT-2: h = ln_f(x) = g * n(x) + beta, so b folds exactly into the final LayerNorm's bias:
         beta' = beta + b * w / (w . w) gives w . beta' = w . beta + b (HF then scores as we do).
  Llama: the final RMSNorm has no bias and nothing after it is constant, so b cannot live in the
         network; config.json carries it as `rlhf_jax_score_bias` and
         `logits + config.rlhf_jax_score_bias` is our score (HF's own logits differ by that one
         constant, which changes no comparison). Import reads it back (0 when absent).
"""
import json
import os

import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models import hf as hf_format
from rlhf_jax.models.config import ModelConfig

ARCHITECTURES = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}
SCORE = "score.weight"
SCORE_BIAS = "rlhf_jax_score_bias"


def is_sequence_classifier(hf_config: dict) -> bool:
  """True when a config.json dict describes a `*ForSequenceClassification` model."""
  archs = hf_config.get("architectures") or []
  return any(str(a).endswith("ForSequenceClassification") for a in archs)


def num_labels(hf_config: dict, where: str = "config.json") -> int:
  """transformers' num_labels: len(id2label) when present, else `num_labels`, else 2."""
  if isinstance(hf_config.get("id2label"), dict):
    return len(hf_config["id2label"])
  value = hf_config.get("num_labels", 2)
  if not isinstance(value, int) or isinstance(value, bool):
    raise UserError(f"{where}: num_labels must be an integer, got {value!r}")
  return value


def fold_bias(ln_bias, kernel, bias):
  """The LayerNorm bias that makes a bias-free score equal `w . h + b`:
  beta' = beta + b * w / (w . w) (float64, cast back to beta's dtype); w . w must be > 0."""
  w = np.asarray(kernel, np.float64).reshape(-1)
  ww = float(w @ w)
  if not ww > 0:
    raise UserError("the reward model's scalar head has an all-zero kernel; its bias cannot be "
                    "folded into the final LayerNorm")
  out = np.asarray(ln_bias, np.float64) + float(np.asarray(bias).reshape(())) * w / ww
  return out.astype(np.asarray(ln_bias).dtype)


def _backbone_cfg(cfg: ModelConfig) -> ModelConfig:
  """The config whose HF tensor names are exactly the backbone's (no lm_head: tied)."""
  return cfg.replace(tie_embeddings=True)


def to_hf_tensors(cfg: ModelConfig, params):
  """(HF-named numpy tensors of the sequence classifier, the bias HF cannot hold).

  GPT-2: the bias is folded into `transformer.ln_f.bias` (residual 0.0); Llama: the residual is
  the head's bias."""
  backbone = {k: v for k, v in params.items() if k != "scalar_head"}
  tensors = hf_format.params_to_hf(_backbone_cfg(cfg), backbone)
  kernel = np.asarray(params["scalar_head"]["kernel"], np.float32)      # (d, 1)
  bias = float(np.asarray(params["scalar_head"]["bias"]).reshape(()))
  tensors[SCORE] = np.ascontiguousarray(kernel.T)                        # (1, d)
  if cfg.flavour == "gpt2":
    tensors["transformer.ln_f.bias"] = fold_bias(tensors["transformer.ln_f.bias"], kernel, bias)
    return tensors, 0.0
  return tensors, bias


def export_pad_id(cfg: ModelConfig, tok) -> int:
  """A pad id HF's classifier can find the last real token with: never a token of a document.

  The tokenizer's pad token when it is neither BOS nor EOS; else the lowest-id special token that
  is neither (e.g. SmolLM2's <|endoftext|>); without a tokenizer the model's pad id when it is
  neither; else a UserError."""
  real = {cfg.bos_token_id, cfg.eos_token_id}
  if tok is not None:
    real |= {tok.bos_token_id, tok.eos_token_id}
    if tok.pad_token_id is not None and tok.pad_token_id not in real:
      return int(tok.pad_token_id)
    for i in sorted(int(i) for i in tok.all_special_ids):
      if i not in real and i < cfg.vocab_size:
        return i
  elif cfg.pad_token_id not in real:
    return int(cfg.pad_token_id)
  raise UserError(f"the model pads with token {cfg.pad_token_id}, which is also its BOS or EOS, "
                  "and its tokenizer has no other special token: Hugging Face's classifier would "
                  "score the token before EOS (add a pad token to the tokenizer)")


def config_to_hf(cfg: ModelConfig, pad_id: int, score_bias: float) -> dict:
  """config.json of the sequence classifier: one label, the export pad id, the residual bias."""
  base = hf_format.config_to_hf(cfg)
  return dict(base, architectures=[ARCHITECTURES[cfg.flavour]], id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0}, pad_token_id=pad_id, **{SCORE_BIAS: score_bias})


def _load_tokenizer(tokenizer_dir):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{tokenizer_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") \
        from None


def write(out: str, cfg: ModelConfig, params, np_dtype, tokenizer_dir=None) -> int:
  """Writes the sequence classifier into the (empty, temporary) directory `out`: weights as
  `np_dtype`, config.json, the tokenizer with its pad token set to the export pad id. Returns
  that pad id."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if "scalar_head" not in params:
    raise UserError("the parameters have no scalar head (not a reward or value model)")
  tok = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
  pad_id = export_pad_id(cfg, tok)
  tensors, residual = to_hf_tensors(cfg, params)
  save_file({k: v.astype(np_dtype) for k, v in tensors.items()},
            os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  config = dict(config_to_hf(cfg, pad_id, residual), dtype=np.dtype(np_dtype).name)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tok is not None:
    tok.pad_token = tok.convert_ids_to_tokens(pad_id)
    tok.save_pretrained(out)
  return pad_id


def from_hf_tensors(cfg: ModelConfig, tensors: dict, hf_config: dict, where: str) -> dict:
  """Our scalar-head parameters from a sequence classifier's tensors: the
  backbone by `hf.lazy_params_from_hf` (lazy leaves: `convert.load_model` reads them whole, or
  places them on a mesh one device slice at a time), the head from `score.weight` (1, d) and
  `rlhf_jax_score_bias`."""
  from rlhf_jax.models import abstract_params  # pylint: disable=g-import-not-at-top  (cycle)
  labels = num_labels(hf_config, where)
  if labels != 1:
    raise UserError(f"{where}: a sequence classifier with {labels} labels; a reward model has "
                    "one (num_labels 1)")
  tensors = dict(tensors)
  if SCORE not in tensors:
    raise UserError(f"{where}: no tensor {SCORE!r} (expected a *ForSequenceClassification "
                    "checkpoint)")
  score = np.asarray(tensors.pop(SCORE), np.float32)
  if score.shape != (1, cfg.d_model):
    raise UserError(f"{where}: tensor {SCORE!r} has shape {score.shape}, expected "
                    f"{(1, cfg.d_model)}")
  try:
    bias = float(hf_config.get(SCORE_BIAS, 0.0))
  except (TypeError, ValueError):
    raise UserError(f"{where}: {SCORE_BIAS} must be a number, got "
                    f"{hf_config.get(SCORE_BIAS)!r}") from None
  backbone_cfg = _backbone_cfg(cfg)
  params = hf_format.lazy_params_from_hf(backbone_cfg, tensors, where,
                                         abstract_params(backbone_cfg))
  params["scalar_head"] = {"kernel": score.T.copy(), "bias": np.asarray([bias], np.float32)}
  return params


def read(path: str, hf_config: dict):
  """(ModelConfig, scalar-head params) of a Hugging Face sequence-classifier directory; the
  backbone's leaves are lazy (`rlhf_jax.models.lazy.materialize` reads them)."""
  where = os.path.join(path, "config.json")
  cfg = hf_format.config_from_hf(hf_config, where)
  params = from_hf_tensors(cfg, hf_format.read_hf_tensors(path), hf_config, path)
  return cfg, params
