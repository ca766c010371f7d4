"""The one transformer, its configs and presets, and parameter helpers."""
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.presets import PRESET_NAMES, get_model_config, preset
from rlhf_jax.models.transformer import (HEADS, Transformer, init_cache, segment_positions,
                                         unstack_layers)
from rlhf_jax.models.params import (abstract_params, count_params, init_params, with_scalar_head)
