"""What the SFT, pretraining and reward-model stages share: config checks, the optimizer and its
schedule, the sharded train state, the generic pure train step with exact gradient accumulation,
data loading, the loop (log / eval / checkpoint / resume) and the atomic final model.

A stage supplies a `Task`: its head, its loss as (sum, count, extra sums), its batches and its
evaluation; `run_loop` does the rest.

Train state (one pytree, every leaf sharded by `rlhf_jax.sharding`'s rule table):
  {'params', 'opt_state', 'step'}.  The step RNG is `fold_in(key(seed), step)`, so it is never
stored in the state and a resumed run draws the same dropout masks as an uninterrupted one.
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
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  model = load_model(path)
  if model.head != "lm":
    raise UserError(f"{where}: {path} holds a model with a {model.head!r} head; expected a "
                    "language model (the previous stage's model)")
  differ = shape_fields_differ(model.cfg, cfg)
  if differ:
    raise UserError(f"{where}: {path} holds a model of another shape than config.model "
                    f"({'; '.join(differ)})")
  check_same_shapes(model.params, abstract_params(cfg, "lm"), f"{where}: {path}")
  return model.params, model.tokenizer_dir


# ----------------------------------------------------------------------------- the step

def forward(cfg, head, params, batch, *, rng=None, train=False):
  """The one model on a (N, T) batch with segment ids and positions."""
  kwargs = {}
  if train:
    kwargs = {"deterministic": False, "rngs": {"dropout": rng}}
  out, _ = Transformer(cfg, head=head).apply(
      {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
      positions=batch.get("positions"), **kwargs)
  return out


def split_micro_batches(batch, num_micro, mesh):
  """(B, ...) -> (A, B/A, ...) with micro-batch a = rows a, a+A, a+2A, ... so every micro-batch
  stays spread over all of the batch shards (no data moves between devices)."""
  def one(x):
    y = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
  return jax.tree.map(one, batch)


def make_train_step(loss_fn, tx, schedule, grad_accum_steps, mesh):
  """The pure step `train_step(state, batch, rng) -> (state, metrics)`.

  loss_fn(params, batch, rng) -> (loss_sum, count, extra) where extra is a dict of sums (metrics
  that are summed over micro-batches, e.g. correct pairs). The gradient is
  `sum_micro grad(loss_sum) / sum_micro count`: exactly the gradient of the full batch's
  `loss_sum / count`, whatever the split.
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
    metrics = {"loss": loss_sum / denom, "count": count, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), **extra}
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

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
  if config.data.source == "offline":
    out = config.data.dir or os.path.join(workdir, "data")
    tfds_dir = os.path.join(out, "tfds")
    if not os.path.isdir(tfds_dir):
      from rlhf_jax.data import prepare  # pylint: disable=g-import-not-at-top
      print(f"preparing the offline task in {out}", flush=True)
      prepare.prepare_offline(out, seed=config.data.task_seed)
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


def begin_stage(config, workdir, stage, previous):
  """Resolves paths, the model config, the mesh, the data and `config.init_from` of a stage.

  Returns None (after saying so) when the stage's final model already exists. `previous` is the
  stage whose model `init_from='auto'` means ('' for none).
  """
  workdir = os.path.abspath(workdir)
  final = final_model_dir(workdir, stage)
  if os.path.exists(final):
    print(f"{stage}: final model exists at {final}; skipping the stage", flush=True)
    return None
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh)
  check_mesh_batch(config, mesh)
  tfds_dir, data_tok_dir = data_paths(config, workdir)
  init_from = config.init_from
  if init_from == "auto":
    init_from = final_model_dir(workdir, previous) if previous else ""
    if init_from and not os.path.exists(init_from):
      raise UserError(f"config.init_from: 'auto' means the {previous} stage's model {init_from}, "
                      f"which does not exist; run that stage first or set config.init_from to a "
                      "model (e.g. smollm2-135m)")
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
  """One compact line per log interval (through tqdm) and `<stage dir>/metrics.jsonl`."""

  def __init__(self, path, bar=None):
    self.path, self.bar = path, bar
    self._f = open(path, "a", encoding="utf-8") if jax.process_index() == 0 else None

  def write(self, kind, step, values):
    if self._f is None:
      return
    record = {"kind": kind, "step": int(step), **{k: float(v) for k, v in values.items()}}
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    line = f"[{kind}] step {step}: " + " ".join(f"{k} {_fmt(float(v))}" for k, v in values.items())
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def close(self):
    if self._f is not None:
      self._f.close()


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
  step_fn = None
  ckpt = CheckpointManager(os.path.join(stage_dir, "checkpoints"),
                           save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    target = sharding.abstract_with_sharding(state, shardings)
    state, meta = ckpt.restore(target, latest)
    batches.set_state(meta["data"])
    start = int(latest)
    print(f"{task.name}: resumed from {ckpt.directory}/{latest}", flush=True)

  bar = tqdm(total=num_steps, initial=start, desc=task.name, dynamic_ncols=True,
             disable=jax.process_index() != 0, file=sys.stderr, mininterval=1.0)
  writer = MetricsWriter(os.path.join(stage_dir, "metrics.jsonl"), bar)
  history = []
  last_eval = {}

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
  try:
    for step in range(start, num_steps):
      local = next(batches)   # host numpy; a stage's iterator checks its batches (e.g. K >= 2)
      batch = sharding.global_batch(local, mesh, config.batch_size)
      if step_fn is None:  # built at the first batch, whose keys and ranks fix the shardings
        step_fn = jit_train_step(
            make_train_step(task.loss_fn, tx, schedule, config.grad_accum_steps, mesh),
            shardings, local, mesh)
      with sharding.activate(mesh):
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
      pending.append(metrics)
      done = step + 1
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
        ckpt.save(done, state, meta={"data": batches.get_state()}, force=done == num_steps)
    if start >= num_steps and config.eval_every:
      do_eval(num_steps)
    ckpt.wait()
  finally:
    bar.close()
    writer.close()
    ckpt.close()
    if hasattr(batches, "close"):
      batches.close()
  return state, last_eval, history


def _mean_metrics(items):
  """Average of per-step metrics; extra sums (e.g. correct/pairs) are summed instead."""
  out = {}
  for key in items[0]:
    values = np.asarray([float(m[key]) for m in items])
    out[key] = float(values.sum() if key.endswith("_sum") else values.mean())
  return out
