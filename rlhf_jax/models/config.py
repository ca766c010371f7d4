"""The model's shape and flavour: a frozen dataclass, built from an ml-collections dict."""
import dataclasses
from typing import Any, Mapping

from rlhf_jax.errors import UserError

FLAVOURS = ("gpt2", "llama")
# What each layer keeps for the backward pass (transformer.REMAT_POLICIES): 'none' keeps every
# activation; 'full' recomputes the whole layer; 'dots_saveable' keeps the outputs of the weight
# matmuls (projections, MLP) and recomputes the rest (norms, attention, activations); 'offload'
# keeps the same matmul outputs in host memory (pinned_host: TPU, GPU; also runs on CPU).
REMAT_POLICIES = ("none", "full", "dots_saveable", "offload")
# How attention is computed (transformer.attention_impl): 'einsum' (float32 scores, the
# reference), 'blocked' (causal query blocks, backward pass recomputing the probabilities:
# models/blocked_attention.py, the CPU path), 'xla' / 'cudnn' (jax.nn.dot_product_attention's
# implementations; cuDNN flash attention needs a GPU and bfloat16/float16), 'splash' (the Pallas
# splash-attention kernel, TPU), 'auto' (the default, per backend: splash on TPU, cuDNN on GPU
# where it applies, else xla; blocked on CPU).
ATTENTION_IMPLS = ("einsum", "blocked", "xla", "cudnn", "splash", "auto")


def remat_policy_name(value) -> str:
  """The remat policy name of a `remat` value: a name, or the old booleans (True = 'full',
  False = 'none', also as the strings 'true'/'false' of a command line)."""
  if isinstance(value, bool):
    return "full" if value else "none"
  if isinstance(value, str) and value.lower() in ("true", "false"):
    return "full" if value.lower() == "true" else "none"
  return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that decides the network's function and parameter shapes.

  flavour 'gpt2': learned positions, LayerNorm (with bias), GELU (tanh) MLP, biases on all projections.
  flavour 'llama': RoPE, RMSNorm, SwiGLU MLP, no biases, grouped-query attention (num_kv_heads).
  """
  flavour: str = "llama"
  vocab_size: int = 512
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  d_ff: int = 256
  max_len: int = 256
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3 style RoPE frequency scaling ("rope_type": "llama3"); factor 0 means off.
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  tie_embeddings: bool = True
  dropout_resid: float = 0.0
  dropout_attn: float = 0.0
  dtype: str = "float32"        # activations / matmul inputs
  param_dtype: str = "float32"
  # Rematerialisation policy (REMAT_POLICIES; the old booleans still read: True = 'full').
  remat: str = "none"
  attention_impl: str = "auto"   # ATTENTION_IMPLS
  scan_layers: bool = True      # False: layers one by one with per-layer params (the decode path)
  # Training and scoring forwards (train/step.py `forward`) run the layers as an unrolled loop on
  # per-layer slices of the stacked parameters (their gradient stacked back once): no layer
  # scan, so no stacked buffers of saved activations and gradients written and read slice by
  # slice. Faster on CPU for a few layers (the tiny presets); compile time grows with the layer
  # count, so deep models keep the scan. Parameters and checkpoints are unchanged.
  unroll_layers: bool = False
  # Embedding and LM-head rows padded to a multiple of this (0 or 1: none), so that the
  # vocabulary divides the tensor axis; the padded ids' logits are masked (transformer._MASKED)
  # in every output, so nothing samples or scores them. `padded_vocab` is the row count.
  vocab_multiple: int = 0
  # The LM losses and log-probs compute the head's float32 logits this many positions at a time
  # (0: all at once), so (tokens x vocab) logits never exist whole (losses.chunked_token_logprobs).
  logits_chunk: int = 0
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policy_name(self.remat))
    problems = []
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat must be one of {REMAT_POLICIES} (or true/false), got "
                      f"{self.remat!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                      f"{self.attention_impl!r}")
    if self.flavour not in FLAVOURS:
      problems.append(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                 "d_ff", "max_len"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    for name in ("vocab_multiple", "logits_chunk"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        problems.append(f"{name} must be a non-negative integer (0 = off), got "
                        f"{getattr(self, name)!r}")
    if not problems and self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                      f"({self.num_kv_heads})")
    if not problems and self.flavour == "llama" and self.head_dim % 2:
      problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("dropout_resid", "dropout_attn"):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        problems.append(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if problems:
      raise UserError("model config: " + "; ".join(problems))

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding (and LM-head columns): vocab_size rounded up to vocab_multiple."""
    m = max(self.vocab_multiple, 1)
    return -(-self.vocab_size // m) * m

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a dict or ConfigDict, rejecting unknown fields by name."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserError(f"model config: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
