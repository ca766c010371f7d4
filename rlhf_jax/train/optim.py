"""The optimizer and the train state: AdamW with global-norm clipping and a warmup + cosine
schedule, the weight-decay mask, and the sharded state {'params', 'opt_state', 'step'}."""
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import sharding
from rlhf_jax.errors import UserError, check_positive, config_field
from rlhf_jax.models import abstract_params, init_params


def check_config(config):
  """The `config.optimizer` fields: lr > 0, decay/clip/warmup/eps >= 0, fractions in range."""
  check_positive(config, "optimizer.lr")
  for name in ("optimizer.weight_decay", "optimizer.grad_clip", "optimizer.warmup_steps"):
    check_positive(config, name, allow_zero=True)
  if not 0.0 <= config.optimizer.final_lr_fraction <= 1.0:
    raise UserError("config.optimizer.final_lr_fraction must be in [0, 1], got "
                    f"{config.optimizer.final_lr_fraction!r}")
  for name in ("optimizer.b1", "optimizer.b2"):
    if not 0.0 <= config_field(config, name) < 1.0:
      raise UserError(f"config.{name} must be in [0, 1), got {config_field(config, name)!r}")
  check_positive(config, "optimizer.eps", allow_zero=True)


def decay_mask(tree):
  """Weight decay on matrices (kernels, embeddings), not on norms or biases."""
  def leaf(path, _):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in ("kernel", "embed", "pos_embed")
  return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=lambda x: hasattr(x, "names"))



def make_schedule(opt_cfg, num_steps):
  """Linear warmup to lr, then cosine decay to final_lr_fraction * lr at num_steps (paper: 10%)."""
  warmup = min(int(opt_cfg.warmup_steps), max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else opt_cfg.lr, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.final_lr_fraction)


def make_optimizer(opt_cfg, num_steps):
  """(AdamW with global-norm clipping and the cosine schedule, the schedule)."""
  schedule = make_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def state_shardings(cfg, head, tx, mesh):
  """{'params', 'opt_state', 'step'} shardings of the train state of a `head` model."""
  boxed = abstract_params(cfg, head, boxed=True)
  return {"params": sharding.param_shardings(boxed, mesh),
          "opt_state": sharding.opt_state_shardings(tx, boxed, mesh),
          "step": sharding.replicated(mesh)}


def create_state(params, tx, shardings):
  """The train state from parameters (host or device arrays), placed on the mesh."""
  params = sharding.put(params, shardings["params"])
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"params": params, "opt_state": opt_state, "step": step}


def random_params(cfg, head, param_shardings, seed):
  """Fresh parameters initialised straight into their shardings."""
  return sharding.init_sharded(lambda key: init_params(cfg, key, head), param_shardings,
                               jax.random.key(seed))
