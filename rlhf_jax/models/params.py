"""Parameter pytrees: init, abstract shapes (no allocation), counting, swapping heads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer


def _init_fn(cfg: ModelConfig, head: str):
  def init(rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg, head=head).init(rng, tokens)["params"]
  return init


def init_params(cfg: ModelConfig, rng, head: str = "lm", boxed: bool = False):
  """Random parameters. boxed=True keeps the flax `LogicallyPartitioned` boxes (axis names)."""
  params = jax.jit(_init_fn(cfg, head))(rng)
  return params if boxed else nn.unbox(params)


def abstract_params(cfg: ModelConfig, head: str = "lm", boxed: bool = False):
  """ShapeDtypeStructs of the parameters, from `jax.eval_shape` (nothing is allocated)."""
  params = jax.eval_shape(_init_fn(cfg, head), jax.random.key(0))
  return params if boxed else nn.unbox(params)


def count_params(cfg: ModelConfig, head: str = "lm") -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg, head))))


def with_scalar_head(params, cfg: ModelConfig, rng, head_shardings=None):
  """Backbone of `params` (an LM) with the LM head dropped and a fresh scalar head added.

  This is how the reward model starts from the SFT model (and the value function from the RM).
  head_shardings: the scalar head's shardings; the head is then initialised under jit straight
  into them (only the head is computed; the same values), as a multi-process run needs.
  """
  if head_shardings is None:
    head = init_params(cfg, rng, head="scalar")["scalar_head"]
  else:
    head = jax.jit(lambda key: init_params(cfg, key, head="scalar")["scalar_head"],
                   out_shardings=head_shardings)(rng)
  out = {k: v for k, v in params.items() if k not in ("lm_head", "scalar_head")}
  out["scalar_head"] = head
  return out
