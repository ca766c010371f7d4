"""The ONE pure train step of the pretrain/SFT/RM stages: the model forward, micro-batches with
exact gradient accumulation, the non-finite guard, and the jit with explicit shardings.

  loss_fn(params, batch, rng) -> (loss_sum, count, {name: sum})      (a stage's loss, sft.py/rm.py)
  make_train_step(loss_fn, tx, schedule, grad_accum_steps, mesh)
      -> train_step(state, batch, rng) -> (state, metrics)           (pure; jit_train_step jits it)
  TrainStep(...)(state, host_batch, rng)                             (the loop's `step` hook)

Train state (one pytree, every leaf sharded by `rlhf_jax.sharding`'s rule table, see optim.py):
  {'params', 'opt_state', 'step'}. The loop draws the step RNG as `fold_in(key, step)`, so it is
  never stored in the state and a resumed run draws the same dropout masks.

Non-finite guard: a step whose loss or global gradient norm is NaN/Inf is not applied
(`guard_nonfinite`: params and optimizer state, its update count included, are kept), while
`step` still advances so the next step reads the next batch and RNG; the learning-rate schedule
therefore follows applied updates (`applied_lr`). PPO's iteration uses the same guard.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.errors import UserError, check_positive
from rlhf_jax.models import Transformer, unstack_layers


# ----------------------------------------------------------------------------- config

# The top-level batch fields of a pretrain/SFT/RM config (PPO's batch is `config.ppo`'s).
FIELDS = ("batch_size", "seq_len", "grad_accum_steps", "eval_batch_size")


def check_config(config):
  """The batch fields of a pretrain/SFT/RM config: sizes, the accumulation split, seq_len."""
  for name in FIELDS:
    check_positive(config, name, kind=int)
  if config.batch_size % config.grad_accum_steps:
    raise UserError(f"config.grad_accum_steps ({config.grad_accum_steps}) must divide "
                    f"config.batch_size ({config.batch_size})")
  if config.seq_len > config.model.max_len:
    raise UserError(f"config.seq_len ({config.seq_len}) exceeds config.model.max_len "
                    f"({config.model.max_len})")


def check_mesh_batch(config, mesh):
  """batch_size / grad_accum_steps (a micro-batch) must split evenly over data x fsdp."""
  n = math.prod(sharding.mesh_sizes(mesh)[a] for a in sharding.BATCH_AXES)
  micro = config.batch_size // config.grad_accum_steps
  if micro % n:
    raise UserError(f"config.batch_size ({config.batch_size}) / config.grad_accum_steps "
                    f"({config.grad_accum_steps}) = {micro} must be a multiple of data x fsdp = {n}")
  if config.eval_batch_size % n:
    raise UserError(f"config.eval_batch_size ({config.eval_batch_size}) must be a multiple of "
                    f"data x fsdp = {n}")


# ----------------------------------------------------------------------------- pieces

def forward(cfg, head, params, batch, *, rng=None, train=False, head_from=0):
  """The one model on a (N, T) batch with segment ids and positions; the head's output at
  positions >= head_from (all by default)."""
  kwargs = {"head_from": head_from}
  if train:
    kwargs.update(deterministic=False, rngs={"dropout": rng})
  if cfg.unroll_layers and cfg.scan_layers:
    cfg, params = cfg.replace(scan_layers=False), unstack_layers(params)
  out, _ = Transformer(cfg, head=head).apply(
      {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
      positions=batch.get("positions"), **kwargs)
  return out


def split_micro_batches(batch, num_micro, mesh=None):
  """(B, ...) -> (A, B/A, ...) with micro-batch a = rows a, a+A, a+2A, ... so every micro-batch
  stays spread over all of the batch shards (no data moves between devices). mesh=None: the
  reshape alone (unsharded)."""
  def one(x):
    y = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return y
    spec = PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
  return jax.tree.map(one, batch)


def guard_nonfinite(old, update, loss, grad_norm):
  """(update() if the update is finite else `old`, finite); update: () -> a pytree like `old`.

  finite = isfinite(loss) & isfinite(grad_norm), decided before the update runs; a `lax.cond`
  then runs only the branch taken, so NaN/Inf from a bad update never reaches the result and a
  finite step (nearly every step) costs the update alone (a select of new against old would read
  both states and write a third: one more pass over params and optimizer state, as long as
  AdamW's own; 3% of a PPO iteration on CPU). Guard everything the update changes (params,
  optimizer state with its count; PPO: value params, EMA...) and leave counters that must move
  past the bad batch (the data/RNG `step`) outside. Jittable.
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return jax.lax.cond(finite, update, lambda: old), finite


def applied_lr(schedule, opt_state, step):
  """The learning rate the optimizer applies next: schedule(its update count), which lags the
  data `step` by the number of skipped (non-finite) steps; `step` if the state has no count."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByScheduleState)) if isinstance(x, optax.ScaleByScheduleState)]
  return schedule(found[0].count if found else step)


# ----------------------------------------------------------------------------- the step

def _grads_of(loss_fn, params, batch, rng):
  """(grad of loss_sum, loss_sum, count, extra sums) of one (micro-)batch."""
  def f(p):
    s, c, extra = loss_fn(p, batch, rng)
    return s, (c, extra)
  (s, (c, extra)), g = jax.value_and_grad(f, has_aux=True)(params)
  return g, s, c, extra


def _accumulated_grads(loss_fn, params, batch, rng, grad_accum_steps, mesh):
  """`_grads_of` summed over `grad_accum_steps` micro-batches (`lax.scan`; micro-batch i draws
  fold_in(rng, i)); one plain call when grad_accum_steps is 1."""
  if grad_accum_steps == 1:
    return _grads_of(loss_fn, params, batch, rng)
  micro = split_micro_batches(batch, grad_accum_steps, mesh)
  zero = jax.eval_shape(lambda p, b, r: _grads_of(loss_fn, p, b, r), params,
                        jax.tree.map(lambda x: x[0], micro), rng)
  zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero)

  def body(acc, xs):
    mb, i = xs
    out = _grads_of(loss_fn, params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, acc, out), None
  out, _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum_steps)))
  return out


def make_train_step(loss_fn, tx, schedule, grad_accum_steps, mesh):
  """The pure step `train_step(state, batch, rng) -> (state, metrics)`.

  loss_fn(params, batch, rng) -> (loss_sum, count, extra) where extra is a dict of sums (metrics
  that are summed over micro-batches, e.g. correct pairs). The gradient is
  `sum_micro grad(loss_sum) / sum_micro count`: exactly the gradient of the full batch's
  `loss_sum / count`, whatever the split.

  Non-finite guard: when the loss or the global gradient norm is NaN/Inf the update is not
  applied (`guard_nonfinite`: params and opt_state unchanged) and metrics['nonfinite'] is 1;
  `step` advances either way (the next step reads the next batch and RNG).
  """
  def train_step(state, batch, rng):
    params = state["params"]
    grad_sums, loss_sum, count, extra = _accumulated_grads(loss_fn, params, batch, rng,
                                                           grad_accum_steps, mesh)
    denom = jnp.maximum(count, 1.0)
    mean_grads = lambda: jax.tree.map(lambda g: g / denom, grad_sums)
    loss, grad_norm = loss_sum / denom, optax.tree.norm(mean_grads())

    def update():   # (the division again, in AdamW's own pass)
      updates, opt_state = tx.update(mean_grads(), state["opt_state"], params)
      return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    kept, finite = guard_nonfinite({"params": params, "opt_state": state["opt_state"]}, update,
                                   loss, grad_norm)
    metrics = {"loss": loss, "count": count, "grad_norm": grad_norm,
               "lr": applied_lr(schedule, state["opt_state"], state["step"]),
               "nonfinite": 1.0 - finite.astype(jnp.float32), **extra}
    return {**kept, "step": state["step"] + 1}, metrics

  return train_step


def jit_train_step(step_fn, state_sh, batch_example, mesh):
  """`step_fn` jitted with explicit in/out shardings and the state donated."""
  rep = sharding.replicated(mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch_example.items()}
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                 donate_argnums=0)


def jit_eval_step(eval_fn, param_sh, batch_example, mesh):
  """`eval_fn(params, batch)` jitted with explicit shardings, its output replicated."""
  rep = sharding.replicated(mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch_example.items()}
  return jax.jit(eval_fn, in_shardings=(param_sh, batch_sh), out_shardings=rep)


class TrainStep:
  """The loop's `step` hook for pretrain/SFT/RM: `(state, host batch, rng) -> (state, metrics)`.

  Places this process's rows of the batch on the mesh (`sharding.global_batch`) and runs
  `make_train_step(loss_fn, ...)`, jitted at the first batch (whose keys and ranks fix the
  batch shardings; the state's own shardings are kept).
  """

  def __init__(self, loss_fn, tx, schedule, grad_accum_steps, mesh, batch_size):
    self.loss_fn, self.tx, self.schedule = loss_fn, tx, schedule
    self.grad_accum_steps, self.mesh, self.batch_size = grad_accum_steps, mesh, batch_size
    self._jitted = None

  def jitted(self, state, local):
    """The jitted step for `state` (arrays or ShapeDtypeStructs with shardings) and batches with
    the keys and ranks of `local`; built once (the memory check lowers this same function, so
    its compilation is reused by the first step)."""
    if self._jitted is None:
      self._jitted = jit_train_step(
          make_train_step(self.loss_fn, self.tx, self.schedule, self.grad_accum_steps, self.mesh),
          jax.tree.map(lambda x: x.sharding, state), local, self.mesh)
    return self._jitted

  def __call__(self, state, local, rng):
    batch = sharding.global_batch(local, self.mesh, self.batch_size)
    jitted = self.jitted(state, local)
    with sharding.activate(self.mesh):
      return jitted(state, batch, rng)
