"""Named model shapes as ml-collections ConfigDicts.

`get_model_config(name)` returns the frozen `ModelConfig`; `preset(name)` the editable ConfigDict (what
config files embed as `config.model`, so `--config.model.num_layers=4` works on the command line).

Shapes:
  tiny, tiny-gpt2      fast CPU tests and the offline default.
  125m ... 175b        GPT-3 paper, Table 2.1 (Brown et al. 2020): n_layers, d_model, n_heads, ctx 2048,
                       GPT-2 vocabulary (50257), tied embeddings; the 'gpt2' flavour.
  gpt2-small           GPT-2 small (12 x 768), the benchmark shape; same as 125m with ctx 1024.
  smollm2-135m         HuggingFaceTB/SmolLM2-135M(-Instruct).
  llama3-1b, llama3-8b Llama 3.2 1B and Llama 3.1 8B shapes (GQA, 128256 vocabulary, llama3 RoPE).
"""
import ml_collections

from rlhf_jax.errors import UserError
from rlhf_jax.models.config import ModelConfig


def _gpt3(num_layers, d_model, num_heads):
  return dict(flavour="gpt2", vocab_size=50257, num_layers=num_layers, d_model=d_model,
              num_heads=num_heads, num_kv_heads=num_heads, head_dim=d_model // num_heads,
              d_ff=4 * d_model, max_len=2048, norm_eps=1e-5, tie_embeddings=True,
              bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)


_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)

_PRESETS = {
    "tiny": dict(flavour="llama", vocab_size=512, num_layers=2, d_model=64, num_heads=4,
                 num_kv_heads=2, head_dim=16, d_ff=192, max_len=256, rope_theta=10000.0,
                 tie_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-gpt2": dict(flavour="gpt2", vocab_size=512, num_layers=2, d_model=64, num_heads=4,
                      num_kv_heads=4, head_dim=16, d_ff=256, max_len=256, tie_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "125m": _gpt3(12, 768, 12),
    "350m": _gpt3(24, 1024, 16),
    "1.3b": _gpt3(24, 2048, 16),
    "6.7b": _gpt3(32, 4096, 32),
    "175b": _gpt3(96, 12288, 96),
    "gpt2-small": dict(_gpt3(12, 768, 12), max_len=1024),
    "smollm2-135m": dict(flavour="llama", vocab_size=49152, num_layers=30, d_model=576, num_heads=9,
                         num_kv_heads=3, head_dim=64, d_ff=1536, max_len=8192, norm_eps=1e-5,
                         rope_theta=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
    "llama3-1b": dict(flavour="llama", vocab_size=128256, num_layers=16, d_model=2048, num_heads=32,
                      num_kv_heads=8, head_dim=64, d_ff=8192, max_len=131072, norm_eps=1e-5,
                      tie_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                      pad_token_id=128001, **dict(_LLAMA3_ROPE, rope_scaling_factor=32.0)),
    "llama3-8b": dict(flavour="llama", vocab_size=128256, num_layers=32, d_model=4096, num_heads=32,
                      num_kv_heads=8, head_dim=128, d_ff=14336, max_len=131072, norm_eps=1e-5,
                      tie_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                      pad_token_id=128001, **_LLAMA3_ROPE),
}
# Short aliases used on command lines and in the issue tracker.
_ALIASES = {"1b": "llama3-1b", "8b": "llama3-8b", "smollm2": "smollm2-135m", "gpt2": "gpt2-small"}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> ml_collections.ConfigDict:
  """The named model shape as an editable ConfigDict with every ModelConfig field filled in."""
  key = _ALIASES.get(name, name)
  if key not in _PRESETS:
    raise UserError(f"model preset {name!r} is unknown; known presets: "
                    f"{sorted(_PRESETS) + sorted(_ALIASES)}")
  return ml_collections.ConfigDict(ModelConfig(**_PRESETS[key]).to_dict())


def get_model_config(name: str, **overrides) -> ModelConfig:
  """The named preset as a frozen ModelConfig, with optional field overrides."""
  d = preset(name).to_dict()
  d.update(overrides)
  return ModelConfig.from_dict(d)
