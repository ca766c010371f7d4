"""The ONE training loop every stage runs (pretrain, SFT, RM, PPO): steps, metrics, evaluation,
checkpoints, resume and the non-finite counter.

A stage hands `run_loop` a `Task` (its step, its batches, its evaluation, its config record) and
a `Cadence` (how many steps, how often to log / evaluate / save); the loop does the rest:

  for step in start .. num_steps - 1:
    state, metrics = task.step(state, next(batches), fold_in(task.rng, step))
    counter.observe(step + 1, task.skipped(metrics))           # non-finite steps, see below
    every log_every steps:        metrics.jsonl / TensorBoard / W&B (train/logs.py): task.reduce(
                                  metrics of the interval) + the rate `task.rate_key`; the
                                  console's one progress bar (or line) shows the key metrics
    every eval_every steps:       task.evaluate(params) (also at step 0 of a fresh run)
    every checkpoint_every steps: state + {'nonfinite', 'config'} + this process's
                                  batches.get_state() (each process its own file)

The step hook is where stages differ: pretrain/SFT/RM pass `step.TrainStep` (the jitted pure
train step; metrics stay on the device until logged), PPO one iteration (rollout, scoring,
minibatch updates) that returns its metrics on the host, with the gold score of its samples
added (`ppo.IterationStep`); PPO also averages its log interval over every iteration
(`mean_over_steps`) where the others average over the applied steps only.

Reliability (what a re-run of the same command relies on):
  resume     `run_loop` restores the newest complete checkpoint in `<workdir>/<stage>/checkpoints`:
             the state, the data-iterator position (taken after the last CONSUMED batch; grain's
             prefetch thread records the position with every batch it builds ahead), the
             non-finite counters and the metrics written up to that step (`metrics.jsonl` is cut
             back to it), so the final model is bit-identical to an uninterrupted run's
             (tests/test_resume.py, tests/test_ppo_resume.py kill runs with SIGKILL). A
             checkpoint written with another config record is refused (`check_resume_config`).
  non-finite a step whose update was not applied (see step.py: `guard_nonfinite`) is counted by
             `NonFiniteCounter`, which logs each skipped step and stops the run after
             `max_nonfinite_steps` in a row, without saving (the last checkpoint is the last
             good state).
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.checkpoint import CheckpointManager
from rlhf_jax.errors import UserError, check_int, check_positive
from rlhf_jax.train import logs


# ----------------------------------------------------------------------------- config

# The top-level length and cadence fields of a pretrain/SFT/RM config (`Cadence.from_config`;
# PPO's are `config.ppo`'s).
FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_steps", "eval_every",
          "eval_batches", "num_epochs")


def check_run_config(config):
  """The loop fields every training stage's top level has, PPO's too: the non-finite limit, the
  seed and the W&B section."""
  check_positive(config, "max_nonfinite_steps", kind=int)
  check_int(config, "seed")
  logs.check_wandb_config(config)


def check_config(config):
  """The loop fields of a pretrain/SFT/RM config: length, cadence, seed, non-finite limit."""
  for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
    check_positive(config, name, kind=int)
  for name in ("num_steps", "eval_every", "eval_batches"):
    check_positive(config, name, kind=int, allow_zero=True)
  check_run_config(config)
  check_positive(config, "num_epochs", allow_zero=True)
  if config.num_steps == 0 and config.num_epochs == 0:
    raise UserError("config.num_steps and config.num_epochs are both 0; set one of them")


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How long the loop runs and how often it logs, evaluates and saves."""
  num_steps: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  max_nonfinite_steps: int
  eval_every: int = 0          # 0: no evaluation

  @classmethod
  def from_config(cls, config, num_steps):
    """The cadence of a pretrain/SFT/RM config (its top-level fields)."""
    return cls(num_steps=num_steps, log_every=config.log_every,
               checkpoint_every=config.checkpoint_every,
               keep_checkpoints=config.keep_checkpoints,
               max_nonfinite_steps=config.max_nonfinite_steps, eval_every=config.eval_every)


# ----------------------------------------------------------------------------- the task

def mean_over_applied_steps(items):
  """Average of per-step metrics (device arrays, fetched here in one transfer) over the applied
  (finite) steps; extra sums (e.g. correct/pairs) are summed instead, and `nonfinite` is the
  number of skipped steps. If every step was skipped, the averages are over all of them (NaN
  shows). Keys in sorted order."""
  items = jax.device_get(items)
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


def mean_over_steps(items):
  """Average of per-step metrics (host floats) over every step of the interval, `nonfinite`
  summed (PPO: the number of skipped minibatch updates). Keys in the order of the first step's."""
  out = {k: float(np.mean([m[k] for m in items])) for k in items[0]}
  out["nonfinite"] = float(sum(m["nonfinite"] for m in items))
  return out


def _nonfinite(metrics):
  return metrics["nonfinite"]


@dataclasses.dataclass
class Task:
  """What one stage plugs into `run_loop`."""
  name: str                  # the stage directory under the workdir ('sft', 'rm', 'ppo_ptx', ...)
  step: Callable             # (state, host batch, rng) -> (state, metrics): one update
  train_batches: Callable    # () -> iterator of host batches with get_state/set_state
  rng: Any                   # the step at data position s draws fold_in(rng, s)
  record: dict               # config record saved with checkpoints; resuming needs the same
  config: Any = None         # the stage's config: config.wandb turns W&B on, the run's config
  evaluate: Optional[Callable] = None       # (params) -> {name: float} (cadence.eval_every)
  reduce: Callable = mean_over_applied_steps   # [step metrics of a log interval] -> {key: float}
  skipped: Callable = _nonfinite            # a step's metrics -> > 0 when nothing was applied
  unit: str = "step"         # what one step is called (NonFiniteError's message)
  rate_key: str = "steps_per_s"             # the logged rate of steps per second
  # (state) -> None: raises a UserError when the step cannot fit the devices' memory
  # (rlhf_jax.plan_compile.check_fits; nothing on CPU); run before anything is written.
  check_memory: Optional[Callable] = None


# ----------------------------------------------------------------------------- metrics

def rewind_metrics(path: str, step: int, write: bool = True) -> list:
  """Cuts `metrics.jsonl` back to what a run resumed at `step` had written: records with
  step <= step (none when step is 0); a line cut by a kill is dropped. Atomic (tmp + rename).
  Returns the kept records. write=False only reads them (every process but the file's one
  writer, process 0: they read the same records whether before or after its rename)."""
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
  if not write:
    return kept
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)
  return kept


# ----------------------------------------------------------------------------- non-finite

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

  `observe` keeps the newest `lag` device-array flags unread (default 1) so reading a flag never
  waits for the step just dispatched; a flag already on the host (PPO's bool: were all of the
  iteration's updates skipped) is read at once; `flush` reads them all. A flag > 0 counts as
  skipped. The error is raised from `observe`/`flush`, before anything of the bad stretch is
  saved.
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
    lag = self.lag if isinstance(nonfinite, jax.Array) else 0
    while len(self._pending) > lag:
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


# ----------------------------------------------------------------------------- resume

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


# Config fields that may differ between a run and its resumption (they do not change the
# trained parameters): logging (W&B too), evaluation, checkpointing, prefetch, the mesh (checkpoints
# restore onto another mesh), where the data folder lives, rematerialisation, the attention
# implementation (same function, another kernel), and the DPO stage's section of the pipeline
# config (`dpo`, `dpo_run`: the PPO stage carries them but does not read them).
RESUME_MAY_DIFFER = ("log_every", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite_steps", "data.prefetch", "data.dir",
                     "mesh", "model.remat", "model.attention_impl", "wandb", "dpo", "dpo_run")


# Config fields added after checkpoints were first written, with the value such a checkpoint's
# run had: a record without the field resumes with that value.
ADDED_FIELDS = {"data.shards": 0}


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
  saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in now}, **saved}
  for name in sorted(set(saved) | set(now)):
    if free(name) or saved.get(name) == now.get(name):
      continue
    raise UserError(f"config.{name} is {now.get(name)!r} but {where} was written with "
                    f"{saved.get(name)!r}; resume with the same config or use a new --workdir")


def _resume(task, ckpt, batches, state):
  """(state, first step, checkpoint meta) from the newest complete checkpoint, or
  (state, 0, {}) when there is none."""
  latest = ckpt.latest_step()
  if latest is None:
    return state, 0, {}
  where = f"the checkpoint {ckpt.directory}/{latest}"
  check_resume_config(ckpt.read_meta(latest).get("config"), task.record, where)
  target = sharding.abstract_with_sharding(state, jax.tree.map(lambda x: x.sharding, state))
  state, meta = ckpt.restore(target, latest)
  # This process's data position (its own file; checkpoints from before kept it in the meta).
  data = ckpt.read_data(latest, default=meta.get("data") if jax.process_count() == 1 else None)
  if data is None:
    raise UserError(f"{where}: it holds no data position for process {jax.process_index()}")
  try:
    batches.set_state(data)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{where}: its data position does not fit this run's data "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                    ) from None
  print(f"{task.name}: resumed from {ckpt.directory}/{latest}", flush=True)
  return state, int(latest), meta


# ----------------------------------------------------------------------------- the loop

def run_loop(task: Task, state, cadence: Cadence, workdir: str, mesh,
             on_eval: Optional[Callable] = None):
  """Trains `cadence.num_steps` steps of `task` from `state` (or from the newest checkpoint in
  `<workdir>/<task.name>/checkpoints`), logging, evaluating and saving on `cadence`.
  on_eval(step, params, eval metrics) runs after each evaluation. Returns (state, last eval
  metrics, history [(kind 'train'|'eval', step, values)] including the resumed records)."""
  if task.check_memory is not None:
    task.check_memory(state)
  stage_dir = os.path.join(workdir, task.name)
  os.makedirs(stage_dir, exist_ok=True)
  batches = task.train_batches()
  ckpt = CheckpointManager(os.path.join(stage_dir, "checkpoints"),
                           save_every=cadence.checkpoint_every, keep=cadence.keep_checkpoints)
  writer, console, primary = None, None, jax.process_index() == 0
  try:
    state, start, resumed_meta = _resume(task, ckpt, batches, state)
    console = logs.Console(task.name, cadence.num_steps, start, cadence.log_every, unit=task.unit,
                           enabled=primary)
    before = rewind_metrics(os.path.join(stage_dir, "metrics.jsonl"), start, write=primary)
    writer = logs.MetricsWriter(stage_dir, task.name, console, primary, start, task.config,
                                workdir)
    counter = NonFiniteCounter(
        cadence.max_nonfinite_steps, last_checkpoint=ckpt.latest_path, unit=task.unit,
        on_skip=lambda step, run, total: writer.write(
            "nonfinite", step, {"consecutive": run, "total": total}))
    counter.load(resumed_meta.get("nonfinite"))
    loop = _Loop(task, cadence, mesh, batches, ckpt, writer, counter, on_eval, before)
    t0 = time.time()
    state = loop.train(state, start, console)
    console.close()
    if primary:
      print(logs.summary_line(task.name, task.unit, cadence.num_steps - start, time.time() - t0,
                              loop.last_train, loop.last_eval, stage_dir), flush=True)
    return state, loop.last_eval, loop.history
  finally:
    if console is not None:
      console.close()
    if writer is not None:
      writer.close()
    ckpt.close()
    if hasattr(batches, "close"):
      batches.close()


class _Loop:
  """The steps of `run_loop` (see there): what lives from one step to the next."""

  def __init__(self, task, cadence, mesh, batches, ckpt, writer, counter, on_eval, before):
    self.task, self.cadence, self.mesh, self.batches = task, cadence, mesh, batches
    self.ckpt, self.writer, self.counter, self.on_eval = ckpt, writer, counter, on_eval
    self.history = [(r["kind"], r["step"],
                     {k: v for k, v in r.items() if k not in ("kind", "step")})
                    for r in before if r.get("kind") in ("train", "eval")]
    self.last_eval = next((m for kind, _, m in reversed(self.history) if kind == "eval"), {})
    self.last_train = next((m for kind, _, m in reversed(self.history) if kind == "train"), {})
    self.pending, self.t_log = [], time.time()

  def train(self, state, start, console):
    """Steps `start` .. num_steps - 1, then the final evaluation and the last save's end."""
    num_steps, eval_every = self.cadence.num_steps, self.cadence.eval_every
    if start == 0 and eval_every:
      self.evaluate(0, state["params"])
    self.t_log = time.time()
    for step in range(start, num_steps):
      local = next(self.batches)  # host numpy; a stage's iterator checks its batches (RM: K >= 2)
      state, metrics = self.task.step(state, local, jax.random.fold_in(self.task.rng, step))
      done = step + 1
      self.counter.observe(done, self.task.skipped(metrics))
      self.pending.append(metrics)
      console.step()
      if done % self.cadence.log_every == 0 or done == num_steps:
        self.log(done)
      if eval_every and (done % eval_every == 0 or done == num_steps):
        self.evaluate(done, state["params"])
      if self.ckpt.should_save(done) or done == num_steps:
        self.counter.flush()      # a run that must stop stops here, before saving
        self.ckpt.save(done, state, meta={"nonfinite": self.counter.state(),
                                          "config": self.task.record},
                       data=self.batches.get_state(), force=done == num_steps)
    self.counter.flush()
    if start >= num_steps and eval_every and not self.last_eval:
      self.evaluate(num_steps, state["params"])
    self.ckpt.wait()
    return state

  def log(self, done):
    """One 'train' record: `task.reduce` of the steps since the last one, and their rate."""
    values = self.task.reduce(self.pending)
    values[self.task.rate_key] = len(self.pending) / max(time.time() - self.t_log, 1e-9)
    self.writer.write("train", done, values)
    self.history.append(("train", done, values))
    self.last_train = values
    self.pending, self.t_log = [], time.time()

  def evaluate(self, step, params):
    """One 'eval' record: `task.evaluate(params)` and its duration; then `on_eval`."""
    t0 = time.time()
    with sharding.activate(self.mesh):
      metrics = self.task.evaluate(params)
    self.last_eval = dict(metrics, eval_seconds=time.time() - t0)
    self.writer.write("eval", step, self.last_eval)
    self.history.append(("eval", step, self.last_eval))
    if self.on_eval is not None:
      self.on_eval(step, params, self.last_eval)
