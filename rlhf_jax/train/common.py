"""What the SFT, pretraining and reward-model stages share: config checks, the optimizer and its
schedule, the sharded train state, the generic pure train step with exact gradient accumulation,
data loading, the loop (log / eval / checkpoint / resume) and the atomic final model.

A stage supplies a `Task`: its head, its loss as (sum, count, extra sums), its batches and its
evaluation; `run_loop` does the rest.

Train state (one pytree, every leaf sharded by `rlhf_jax.sharding`'s rule table):
  {'params', 'opt_state', 'step'}.  The step RNG is `fold_in(key(seed + 1), step)`, so it is never
stored in the state and a resumed run draws the same dropout masks as an uninterrupted one.

Reliability (what a re-run of the same command relies on):
  resume     `run_loop` restores the newest complete checkpoint: the state, the data-iterator
             position (taken after the last CONSUMED batch; grain's prefetch thread records the
             position with every batch it builds ahead), the non-finite counters and the
             metrics written up to that step (`metrics.jsonl` is cut back to it), so the final
             model is bit-identical to an uninterrupted run's (tests/test_resume.py kills runs
             with SIGKILL). A checkpoint written with another config is refused
             (`check_resume_config`).
  non-finite a step whose loss or global gradient norm is NaN/Inf is not applied
             (`guard_nonfinite`: params and optimizer state, its update count included, are kept),
             while `step` still advances so the next step reads the next batch and RNG; the
             learning-rate schedule therefore follows applied updates. `NonFiniteCounter` logs
             each skipped step and stops the run after `config.max_nonfinite_steps` in a row,
             without saving (the last checkpoint is the last good state).
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, Transformer, abstract_params, init_params

STAGE_META = "rlhf_jax_stage.json"


# ----------------------------------------------------------------------------- config checks

def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_positive(config, dotted, kind=float, allow_zero=False):
  """One-line UserError naming `config.<dotted>` unless it is a positive number of `kind`."""
  try:
    value = _get(config, dotted)
  except (KeyError, AttributeError):
    raise UserError(f"config.{dotted} is missing") from None
  ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    ok_type = isinstance(value, int) and not isinstance(value, bool)
  if not ok_type or not (value >= 0 if allow_zero else value > 0):
    what = "an integer" if kind is int else "a number"
    raise UserError(f"config.{dotted} must be {what} {'>= 0' if allow_zero else '> 0'}, "
                    f"got {value!r}")
  return value


def check_int(config, dotted):
  """One-line UserError naming `config.<dotted>` unless it is an integer (e.g. a seed)."""
  try:
    value = _get(config, dotted)
  except (KeyError, AttributeError):
    raise UserError(f"config.{dotted} is missing") from None
  if not isinstance(value, int) or isinstance(value, bool):
    raise UserError(f"config.{dotted} must be an integer, got {value!r}")
  return value


def validate_config(config):
  """Checks every field a stage reads, before anything is loaded or written."""
  from rlhf_jax.train import STAGE_NAMES  # pylint: disable=g-import-not-at-top
  if "stage" not in config or config.stage not in STAGE_NAMES:
    raise UserError(f"config.stage must be one of {', '.join(STAGE_NAMES)}, "
                    f"got {config.get('stage')!r}")
  if "model" not in config:
    raise UserError("config.model is missing (expected a model preset ConfigDict)")
  ModelConfig.from_dict(config.model)
  sharding.parse_mesh_shape(config.mesh.shape, "config.mesh.shape")
  check_positive(config, "optimizer.lr")
  for name in ("optimizer.weight_decay", "optimizer.grad_clip", "optimizer.warmup_steps"):
    check_positive(config, name, allow_zero=True)
  if not 0.0 <= config.optimizer.final_lr_fraction <= 1.0:
    raise UserError("config.optimizer.final_lr_fraction must be in [0, 1], got "
                    f"{config.optimizer.final_lr_fraction!r}")
  for name in ("optimizer.b1", "optimizer.b2"):
    if not 0.0 <= _get(config, name) < 1.0:
      raise UserError(f"config.{name} must be in [0, 1), got {_get(config, name)!r}")
  for name in ("batch_size", "seq_len", "grad_accum_steps", "eval_batch_size", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    check_positive(config, name, kind=int)
  for name in ("num_steps", "eval_every", "eval_batches"):
    check_positive(config, name, kind=int, allow_zero=True)
  check_positive(config, "max_nonfinite_steps", kind=int)
  check_positive(config, "optimizer.eps", allow_zero=True)
  check_positive(config, "data.prefetch", kind=int, allow_zero=True)
  for name in ("seed", "data_seed", "data.task_seed"):
    check_int(config, name)
  check_positive(config, "num_epochs", allow_zero=True)
  if config.num_steps == 0 and config.num_epochs == 0:
    raise UserError("config.num_steps and config.num_epochs are both 0; set one of them")
  if config.batch_size % config.grad_accum_steps:
    raise UserError(f"config.grad_accum_steps ({config.grad_accum_steps}) must divide "
                    f"config.batch_size ({config.batch_size})")
  if config.seq_len > config.model.max_len:
    raise UserError(f"config.seq_len ({config.seq_len}) exceeds config.model.max_len "
                    f"({config.model.max_len})")
  if config.stage == "rm":
    k_max = config.k_max
    if not isinstance(k_max, int) or isinstance(k_max, bool) or (k_max != 0 and k_max < 2):
      raise UserError(f"config.k_max must be an integer >= 2 (or 0: the largest K in the data), "
                      f"got {k_max!r}")
    check_positive(config, "norm_examples", kind=int, allow_zero=True)
  if config.data.source not in ("offline", "dir"):
    raise UserError(f"config.data.source must be 'offline' or 'dir', got {config.data.source!r}")
  if config.data.source == "dir" and not config.data.dir:
    raise UserError("config.data.dir is required when config.data.source is 'dir'")
  if config.data.source == "offline":
    from rlhf_jax.data import offline_task  # pylint: disable=g-import-not-at-top
    offline_task.from_config(config.data.get("task", {}))


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


# ----------------------------------------------------------------------------- optimizer

def _decay_mask(tree):
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
                           weight_decay=opt_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- state

def state_shardings(cfg, head, tx, mesh):
  boxed = abstract_params(cfg, head, boxed=True)
  return {"params": sharding.param_shardings(boxed, mesh),
          "opt_state": sharding.opt_state_shardings(tx, boxed, mesh),
          "step": sharding.replicated(mesh)}


def create_state(params, tx, shardings):
  """The train state from parameters (host or device arrays), placed on the mesh."""
  params = jax.device_put(params, shardings["params"])
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"params": params, "opt_state": opt_state, "step": step}


def random_params(cfg, head, param_shardings, seed):
  """Fresh parameters initialised straight into their shardings."""
  return sharding.init_sharded(lambda key: init_params(cfg, key, head), param_shardings,
                               jax.random.key(seed))


def check_same_shapes(loaded, expected, where):
  """UserError naming the first parameter whose shape differs (e.g. RM init from a model of
  another shape)."""
  from rlhf_jax.checkpoint import check_matches  # pylint: disable=g-import-not-at-top
  describe = lambda tree: {jax.tree_util.keystr(p): [list(np.shape(x)), "float"]
                           for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  check_matches(describe(loaded), describe(expected), where)


def shape_fields_differ(a: ModelConfig, b: ModelConfig):
  """Names of the fields that decide parameter shapes and differ between two model configs."""
  fields = ("flavour", "vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
            "head_dim", "d_ff", "tie_embeddings")
  out = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
  if a.flavour == "gpt2" and b.flavour == "gpt2" and a.max_len != b.max_len:
    out.append(f"max_len {a.max_len} vs {b.max_len}")
  return out


def load_init_model(path, cfg, where):
  """Parameters (host arrays, LM head) and tokenizer dir of the model at `path`, checked against
  the run's model config `cfg` (shape fields must agree; dropout/dtype/remat come from cfg)."""
  from rlhf_jax.checkpoint import quiet_aborted_reads  # pylint: disable=g-import-not-at-top
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  quiet_aborted_reads()    # a damaged model: one line, no tensorstore noise
  try:
    model = load_model(path)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None
  if model.head != "lm":
    raise UserError(f"{where}: {path} holds a model with a {model.head!r} head; expected a "
                    "language model (the previous stage's model)")
  differ = shape_fields_differ(model.cfg, cfg)
  if differ:
    raise UserError(f"{where}: {path} holds a model of another shape than config.model "
                    f"({'; '.join(differ)})")
  check_same_shapes(model.params, abstract_params(cfg, "lm"), f"{where}: {path}")
  return model.params, model.tokenizer_dir


def load_scalar_model(path, policy_cfg, field):
  """(config with dropout off, params) of the scalar-head model at `path` (a reward model or value
  function), checked to score the policy's tokens; errors name `config.<field>`."""
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  model = load_model(path)
  if model.head != "scalar":
    raise UserError(f"config.{field}: {path} holds a model with a {model.head!r} head; expected a "
                    "reward model (scalar head)")
  if model.cfg.vocab_size != policy_cfg.vocab_size:
    raise UserError(f"config.{field}: {path} has vocab_size {model.cfg.vocab_size} but the policy "
                    f"has {policy_cfg.vocab_size}; they must share the tokenizer")
  check_same_shapes(model.params, abstract_params(model.cfg, "scalar"), f"config.{field}: {path}")
  return model.cfg.replace(dropout_resid=0.0, dropout_attn=0.0), model.params


# ----------------------------------------------------------------------------- the step

def forward(cfg, head, params, batch, *, rng=None, train=False, head_from=0):
  """The one model on a (N, T) batch with segment ids and positions; the head's output at
  positions >= head_from (all by default)."""
  kwargs = {"head_from": head_from}
  if train:
    kwargs.update(deterministic=False, rngs={"dropout": rng})
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


def guard_nonfinite(old, new, loss, grad_norm):
  """(`new` if the update is finite else `old`, finite) for any pytrees `old`/`new` alike.

  finite = isfinite(loss) & isfinite(grad_norm); out = where(finite, new, old) leaf by leaf.
  A select, not a blend, so NaN/Inf in `new` never reaches the result. Guard everything the
  update changes (params, optimizer state with its count; PPO: value params, EMA...) and leave
  counters that must move past the bad batch (the data/RNG `step`) outside. Jittable.
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return jax.tree.map(lambda a, b: jnp.where(finite, b, a), old, new), finite


def applied_lr(schedule, opt_state, step):
  """The learning rate the optimizer applies next: schedule(its update count), which lags the
  data `step` by the number of skipped (non-finite) steps; `step` if the state has no count."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByScheduleState)) if isinstance(x, optax.ScaleByScheduleState)]
  return schedule(found[0].count if found else step)


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
  def grads_of(params, batch, rng):
    def f(p):
      s, c, extra = loss_fn(p, batch, rng)
      return s, (c, extra)
    (s, (c, extra)), g = jax.value_and_grad(f, has_aux=True)(params)
    return g, s, c, extra

  def train_step(state, batch, rng):
    params = state["params"]
    if grad_accum_steps == 1:
      grads, loss_sum, count, extra = grads_of(params, batch, rng)
    else:
      micro = split_micro_batches(batch, grad_accum_steps, mesh)
      zero = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), rng)
      zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero)

      def body(acc, xs):
        mb, i = xs
        out = grads_of(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, out), None
      (grads, loss_sum, count, extra), _ = jax.lax.scan(
          body, zero, (micro, jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
    kept, finite = guard_nonfinite({"params": params, "opt_state": state["opt_state"]},
                                   {"params": new_params, "opt_state": opt_state}, loss, grad_norm)
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
  rep = sharding.replicated(mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch_example.items()}
  return jax.jit(eval_fn, in_shardings=(param_sh, batch_sh), out_shardings=rep)


# ----------------------------------------------------------------------------- data

def data_paths(config, workdir):
  """(tfds data_dir, default tokenizer dir) of the run's data; the offline task is prepared
  under `<workdir>/data` when missing."""
  if config.data.source == "dir" and not os.path.isdir(config.data.dir):
    raise UserError(f"config.data.dir: {config.data.dir} is not a directory")
  if config.data.source == "offline":
    out = config.data.dir or os.path.join(workdir, "data")
    tfds_dir = os.path.join(out, "tfds")
    from rlhf_jax.data import offline_task, prepare  # pylint: disable=g-import-not-at-top
    task, sizes = offline_task.from_config(config.data.get("task", {}))
    if not os.path.isdir(tfds_dir):
      print(f"preparing the offline task in {out}", flush=True)
      prepare.prepare_offline(out, task, sizes, seed=config.data.task_seed)
    else:
      offline_task.check_prepared(out, task, sizes, config.data.task_seed)
    return tfds_dir, os.path.join(out, "tokenizer")
  tfds_dir = os.path.join(config.data.dir, "tfds")
  if not os.path.isdir(tfds_dir):
    tfds_dir = config.data.dir
  return tfds_dir, os.path.join(config.data.dir, "tokenizer")


def load_tokenizer_for(config, model_tokenizer_dir, data_tokenizer_dir, cfg):
  from rlhf_jax.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  path = config.data.tokenizer or model_tokenizer_dir or data_tokenizer_dir
  if not path or not os.path.isdir(path):
    raise UserError(f"config.data.tokenizer: no tokenizer at {path!r} (set it to a tokenizer "
                    "directory)")
  tok = load_tokenizer(path)
  if tok.vocab_size > cfg.vocab_size:
    raise UserError(f"config.data.tokenizer: {path} has {tok.vocab_size} tokens, more than the "
                    f"model's vocab_size {cfg.vocab_size}")
  return tok, path


def local_batch_size(mesh, global_size):
  rows = sharding.process_batch_rows(mesh, global_size)
  return rows.stop - rows.start


def load_split(tfds_dir, kind, split, field):
  """The TFDS source of one split; a missing split names its config field."""
  from rlhf_jax.data import builders  # pylint: disable=g-import-not-at-top
  if kind in builders.BUILDERS:
    info = os.path.join(tfds_dir, builders.BUILDERS[kind].name, builders.VERSION,
                        "dataset_info.json")
    if not os.path.isfile(info):   # checked here: tfds would log a warning line first
      raise UserError(f"config.data.{field}: {tfds_dir} holds no prepared {kind} dataset (no "
                      f"{os.path.relpath(info, tfds_dir)}; make it with rlhf_jax.data.prepare)")
  try:
    return builders.load_source(tfds_dir, kind, split)
  except UserError as e:
    raise UserError(f"config.data.{field}: {e}") from None


class KeyedBatches:
  """A resumable training iterator that keeps only the keys the step needs.

  check(batch) runs on every host batch before it is trimmed (e.g. the RM's K >= 2 check);
  get_state/set_state pass through to the loader's iterator.
  """

  def __init__(self, it, keys, check=None):
    self._it, self._keys, self._check = it, keys, check

  def __next__(self):
    batch = next(self._it)
    if self._check is not None:
      self._check(batch)
    return {k: batch[k] for k in self._keys}

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()


@dataclasses.dataclass
class StageSetup:
  """What every stage resolves before it builds anything (see `begin_stage`)."""
  workdir: str
  stage_dir: str
  cfg: ModelConfig
  mesh: Any
  tfds_dir: str
  data_tokenizer_dir: str
  init_from: str       # the model to start from ('' = random init)


def check_workdir(workdir):
  """The absolute workdir; a UserError when it exists but is not a directory."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir: {workdir} is a file, expected a directory")
  for parent in _parents(workdir):
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise UserError(f"--workdir: {parent} is a file, so {workdir} cannot be created")
  return workdir


def _parents(path):
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    yield path


def check_checkpoints(config, directory):
  """Fails early (before models and data are loaded) when the run would resume from checkpoints
  in `directory` it cannot use: not ours, an unreadable record, or another config. The arrays
  themselves are read (and checked) when the loop restores them."""
  if not os.path.exists(directory) or (os.path.isdir(directory) and not os.listdir(directory)):
    return
  from rlhf_jax.checkpoint import CheckpointManager  # pylint: disable=g-import-not-at-top
  with CheckpointManager(directory, save_every=config.checkpoint_every,
                         keep=config.keep_checkpoints) as ckpt:
    latest = ckpt.latest_step()
    if latest is not None:
      check_resume_config(ckpt.read_meta(latest).get("config"), config,
                          f"the checkpoint {ckpt.directory}/{latest}")


def begin_stage(config, workdir, stage, previous):
  """Resolves paths, the model config, the mesh, the data and `config.init_from` of a stage.

  Returns None (after saying so) when the stage's final model already exists. `previous` is the
  stage whose model `init_from='auto'` means ('' for none).
  """
  workdir = check_workdir(workdir)
  final = final_model_dir(workdir, stage)
  if os.path.exists(final):
    print(f"{stage}: final model exists at {final}; skipping the stage", flush=True)
    return None
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh)
  check_mesh_batch(config, mesh)
  init_from = config.init_from   # checked before the offline data are prepared (written)
  if init_from == "auto":
    init_from = final_model_dir(workdir, previous) if previous else ""
    if init_from and not os.path.exists(init_from):
      raise UserError(f"config.init_from: 'auto' means the {previous} stage's model {init_from}, "
                      f"which does not exist; run that stage first or set config.init_from to a "
                      "model (e.g. smollm2-135m)")
  check_checkpoints(config, os.path.join(workdir, stage, "checkpoints"))
  tfds_dir, data_tok_dir = data_paths(config, workdir)
  return StageSetup(workdir, os.path.join(workdir, stage), cfg, mesh, tfds_dir, data_tok_dir,
                    init_from)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Task:
  """What one stage plugs into `run_loop`."""
  name: str                       # 'pretrain' | 'sft' | 'rm' (the stage directory's name)
  head: str                       # 'lm' | 'scalar'
  loss_fn: Callable               # (params, batch, rng) -> (loss_sum, count, {name: sum})
  train_batches: Callable         # () -> iterator with get_state/set_state (host numpy batches)
  evaluate: Callable              # (params) -> {name: float}
  summarize: Optional[Callable] = None       # (metrics dict of floats) -> dict of floats (derived)


def _fmt(v):
  if isinstance(v, float):
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
      return f"{v:.3e}"
    return f"{v:.4f}"
  return str(v)


class MetricsWriter:
  """One compact line per log interval (through tqdm), `<stage dir>/metrics.jsonl` and TensorBoard
  event files in `<stage dir>/tensorboard` (tags `<kind>/<metric>`), on process 0 only."""

  def __init__(self, path, bar=None):
    self.path, self.bar = path, bar
    self._f = open(path, "a", encoding="utf-8") if jax.process_index() == 0 else None
    self._events = None
    if self._f is not None:
      from rlhf_jax import report  # pylint: disable=g-import-not-at-top
      self._events = report.EventWriter(os.path.join(os.path.dirname(path), "tensorboard"))

  def write(self, kind, step, values):
    if self._f is None:
      return
    record = {"kind": kind, "step": int(step), **{k: float(v) for k, v in values.items()}}
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    from rlhf_jax import report  # pylint: disable=g-import-not-at-top
    self._events.scalars(int(step), report.scalar_tags(record))
    line = f"[{kind}] step {step}: " + " ".join(
        f"{k} {_fmt(v if isinstance(v, int) else float(v))}" for k, v in values.items())
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def close(self):
    if self._f is not None:
      self._f.close()
      self._events.close()


def final_model_dir(workdir, stage):
  return os.path.join(workdir, stage, "model")


def save_final(stage_dir, cfg, params, head, tokenizer_dir, meta):
  """Writes `<stage_dir>/model` atomically: the model (rlhf_jax format, readable by
  `rlhf_jax.convert.load_model` and `rlhf_jax.generate`), its tokenizer and `rlhf_jax_stage.json`
  (what the stage did: steps, final metrics, e.g. the reward normalisation bias)."""
  from rlhf_jax.convert import save_model  # pylint: disable=g-import-not-at-top
  final = os.path.join(stage_dir, "model")
  partial = os.path.join(stage_dir, ".model.partial")
  if os.path.exists(partial):
    shutil.rmtree(partial)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  save_model(partial, cfg, host, fmt="rlhf_jax", head=head, tokenizer_dir=tokenizer_dir)
  with open(os.path.join(partial, STAGE_META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.rename(partial, final)
  return final


# ----------------------------------------------------------------------------- reliability

class NonFiniteError(UserError):
  """The run stopped after too many consecutive non-finite steps (exit status 2, one line)."""


class NonFiniteCounter:
  """Counts skipped (non-finite) steps, total and in a row, and stops the run after `limit` in a
  row with a one-line `NonFiniteError` naming the step and the last good checkpoint.

    counter = NonFiniteCounter(config.max_nonfinite_steps,
                               last_checkpoint=ckpt.latest_path, on_skip=log_fn)
    counter.observe(done, metrics["nonfinite"])    # after each step; a device array is fine
    counter.flush()                                # before a checkpoint save and at the end
    meta["nonfinite"] = counter.state()            # saved with the checkpoint ...
    counter.load(meta.get("nonfinite"))            # ... and restored on resume

  `observe` keeps the newest `lag` flags unread (default 1) so reading a flag never waits for the
  step just dispatched; `flush` reads them all. A flag > 0 counts as skipped (PPO: pass
  whether the whole iteration was skipped). The error is raised from `observe`/`flush`, before
  anything of the bad stretch is saved.
  """

  def __init__(self, limit: int, last_checkpoint: Callable[[], Optional[str]] = lambda: None,
               on_skip: Optional[Callable[[int, int, int], None]] = None, unit: str = "step",
               field: str = "config.max_nonfinite_steps", lag: int = 1):
    self.limit, self.last_checkpoint, self.on_skip = int(limit), last_checkpoint, on_skip
    self.unit, self.field, self.lag = unit, field, int(lag)
    self.total, self.consecutive = 0, 0
    self._pending = []

  def observe(self, step: int, nonfinite) -> None:
    self._pending.append((int(step), nonfinite))
    while len(self._pending) > self.lag:
      self._resolve(*self._pending.pop(0))

  def flush(self) -> None:
    while self._pending:
      self._resolve(*self._pending.pop(0))

  def _resolve(self, step, flag):
    if float(np.asarray(jax.device_get(flag))) <= 0:
      self.consecutive = 0
      return
    self.total += 1
    self.consecutive += 1
    if self.on_skip is not None:
      self.on_skip(step, self.consecutive, self.total)
    if self.consecutive >= self.limit:
      self._pending.clear()
      where = self.last_checkpoint()
      where = f"the last good checkpoint is {where}" if where else "no checkpoint was written"
      raise NonFiniteError(
          f"{self.unit} {step}: the loss or gradient was not finite for {self.consecutive} "
          f"consecutive {self.unit}s ({self.field} = {self.limit}); stopped without saving; "
          f"{where}")

  def state(self) -> dict:
    return {"total": self.total, "consecutive": self.consecutive}

  def load(self, state: Optional[dict]) -> None:
    if state:
      self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


# Config fields that may differ between a run and its resumption (they do not change the
# trained parameters): logging, evaluation, checkpointing, prefetch, the mesh (checkpoints
# restore onto another mesh), where the data folder lives, rematerialisation.
RESUME_MAY_DIFFER = ("log_every", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite_steps", "data.prefetch", "data.dir",
                     "mesh", "model.remat")


def config_record(config) -> dict:
  """The config as flat JSON values {dotted field: value}, for the checkpoint meta."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict):
        walk(name + ".", value)
      else:
        flat[name] = value
  walk("", json.loads(json.dumps(config.to_dict(), default=str)))
  return flat


def check_resume_config(saved: Optional[dict], config, where: str) -> None:
  """UserError naming the first field (outside RESUME_MAY_DIFFER) whose value differs from the
  one the checkpoint at `where` was written with: resuming is for the same command."""
  if not saved:
    return
  now = config if isinstance(config, dict) else config_record(config)   # a ConfigDict or a record
  free = lambda name: any(name == f or name.startswith(f + ".") for f in RESUME_MAY_DIFFER)
  for name in sorted(set(saved) | set(now)):
    if free(name) or saved.get(name) == now.get(name):
      continue
    raise UserError(f"config.{name} is {now.get(name)!r} but {where} was written with "
                    f"{saved.get(name)!r}; resume with the same config or use a new --workdir")


def rewind_metrics(path: str, step: int) -> list:
  """Cuts `metrics.jsonl` back to what a run resumed at `step` had written: records with
  step <= step (none when step is 0); a line cut by a kill is dropped. Atomic (tmp + rename).
  Returns the kept records."""
  if not os.path.exists(path):
    return []
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and step > 0 and int(record.get("step", step + 1)) <= step:
        kept.append(record)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)
  return kept


def run_loop(task: Task, config, workdir, cfg, mesh, tx, schedule, state, num_steps,
             on_eval: Optional[Callable] = None):
  """Trains `num_steps` steps with periodic eval, logging and checkpoints; resumes from the newest
  checkpoint in `<workdir>/<stage>/checkpoints`. Returns (state, last eval metrics, history)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from rlhf_jax.checkpoint import CheckpointManager  # pylint: disable=g-import-not-at-top

  stage_dir = os.path.join(workdir, task.name)
  os.makedirs(stage_dir, exist_ok=True)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  base_rng = jax.random.key(config.seed + 1)
  batches = task.train_batches()
  ckpt = CheckpointManager(os.path.join(stage_dir, "checkpoints"),
                           save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  writer, bar = None, None
  try:
    start, resumed_meta = 0, {}
    latest = ckpt.latest_step()
    if latest is not None:
      where = f"the checkpoint {ckpt.directory}/{latest}"
      check_resume_config(ckpt.read_meta(latest).get("config"), config, where)
      target = sharding.abstract_with_sharding(state, shardings)
      state, resumed_meta = ckpt.restore(target, latest)
      try:
        batches.set_state(resumed_meta["data"])
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{where}: its data position does not fit this run's data "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None
      start = int(latest)
      print(f"{task.name}: resumed from {ckpt.directory}/{latest}", flush=True)

    bar = tqdm(total=num_steps, initial=start, desc=task.name, dynamic_ncols=True,
               disable=jax.process_index() != 0, file=sys.stderr, mininterval=1.0)
    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    if jax.process_index() == 0:
      before = rewind_metrics(metrics_path, start)
    else:
      before = []
    writer = MetricsWriter(metrics_path, bar)
    history = [(r["kind"], r["step"], {k: v for k, v in r.items() if k not in ("kind", "step")})
               for r in before if r.get("kind") in ("train", "eval")]
    last_eval = next((m for kind, _, m in reversed(history) if kind == "eval"), {})
    counter = NonFiniteCounter(
        config.max_nonfinite_steps, last_checkpoint=ckpt.latest_path,
        on_skip=lambda step, run, total: writer.write(
            "nonfinite", step, {"consecutive": run, "total": total}))
    counter.load(resumed_meta.get("nonfinite"))
    record = config_record(config)
    return _train(task, config, mesh, tx, schedule, state, num_steps, on_eval, shardings,
                  base_rng, batches, ckpt, writer, bar, counter, record, history, last_eval,
                  start)
  finally:
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    ckpt.close()
    if hasattr(batches, "close"):
      batches.close()


def _train(task, config, mesh, tx, schedule, state, num_steps, on_eval, shardings, base_rng,
           batches, ckpt, writer, bar, counter, record, history, last_eval, start):
  """The steps of `run_loop` from `start` (see there)."""
  step_fn = None

  def do_eval(step):
    nonlocal last_eval
    t0 = time.time()
    with sharding.activate(mesh):
      last_eval = task.evaluate(state["params"])
    last_eval = dict(last_eval, eval_seconds=time.time() - t0)
    writer.write("eval", step, last_eval)
    history.append(("eval", step, last_eval))
    if on_eval is not None:
      on_eval(step, state["params"], last_eval)

  if start == 0 and config.eval_every:
    do_eval(0)
  pending, t_log = [], time.time()
  for step in range(start, num_steps):
    local = next(batches)   # host numpy; a stage's iterator checks its batches (e.g. K >= 2)
    batch = sharding.global_batch(local, mesh, config.batch_size)
    if step_fn is None:  # built at the first batch, whose keys and ranks fix the shardings
      step_fn = jit_train_step(
          make_train_step(task.loss_fn, tx, schedule, config.grad_accum_steps, mesh),
          shardings, local, mesh)
    with sharding.activate(mesh):
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
    done = step + 1
    counter.observe(done, metrics["nonfinite"])
    pending.append(metrics)
    bar.update(1)
    if done % config.log_every == 0 or done == num_steps:
      values = _mean_metrics(jax.device_get(pending))
      if task.summarize is not None:
        values = task.summarize(values)
      values["steps_per_s"] = len(pending) / max(time.time() - t_log, 1e-9)
      writer.write("train", done, values)
      history.append(("train", done, values))
      pending, t_log = [], time.time()
    if config.eval_every and (done % config.eval_every == 0 or done == num_steps):
      do_eval(done)
    if ckpt.should_save(done) or done == num_steps:
      counter.flush()      # a run that must stop stops here, before saving
      ckpt.save(done, state, meta={"data": batches.get_state(), "nonfinite": counter.state(),
                                   "config": record}, force=done == num_steps)
  counter.flush()
  if start >= num_steps and config.eval_every and not last_eval:
    do_eval(num_steps)
  ckpt.wait()
  return state, last_eval, history


def _mean_metrics(items):
  """Average of per-step metrics over the applied (finite) steps; extra sums (e.g.
  correct/pairs) are summed instead, and `nonfinite` is the number of skipped steps. If every
  step was skipped, the averages are over all of them (NaN shows)."""
  skipped = [float(m.get("nonfinite", 0.0)) > 0 for m in items]
  use = [m for m, bad in zip(items, skipped) if not bad] or items
  out = {}
  for key in items[0]:
    if key == "nonfinite":
      out[key] = float(sum(skipped))
      continue
    values = np.asarray([float(m[key]) for m in use])
    out[key] = float(values.sum() if key.endswith("_sum") else values.mean())
  return out
