"""Where the training loop's metrics go: `<stage dir>/metrics.jsonl`, TensorBoard event files in
`<stage dir>/tensorboard` (tags `<kind>/<metric>`, `report.scalar_tags`), an optional Weights &
Biases run, and the console. The loop makes them on process 0 only (`primary`).

The console shows ONE progress display per stage, never a line per logged step (the per-step
detail is in metrics.jsonl, TensorBoard and W&B):
  stderr is a terminal   a tqdm bar with the key metrics of the last log as its postfix
                         (`key_metrics`: loss, acc, reward, kl; eval_loss, eval_acc)
  otherwise (CI, logs)   tqdm's carriage-return redraws would pile up in the file, so no bar:
                         a plain line on stderr every `line_every` steps (about ten per stage, on
                         log steps) and at the last step, with the same metrics
and after the last step the loop's one summary line on stdout (`summary_line`). A skipped
(non-finite) step is a warning line either way. `progress` is the same display for a loop with no
metrics (the sampler calls of collect and evaluate, through rollout.progress).

Weights & Biases (`config.wandb`; off unless `project` is set; `pip install 'rlhf_jax[wandb]'`):
one run per stage (a resumed stage starts a new one), named `<group>-<stage>` in the group
`config.wandb.name` (default: the workdir's name), with the stage's config as the run config and
every metrics record as `<kind>/<metric>` at its step, the tags TensorBoard shows. The run's files
go to `<stage dir>/wandb/`. wandb is imported only then; if it fails to start or to log, ONE
warning goes to stderr and training goes on.
"""
import importlib.util
import json
import math
import os
import sys
import time
from typing import Mapping, Optional

from tqdm import tqdm

from rlhf_jax import report
from rlhf_jax.errors import UserError

WANDB_MODES = ("", "online", "offline", "disabled")   # '': wandb's own (WANDB_MODE, else online)
WANDB_FIELDS = ("project", "entity", "name", "mode")

# metrics record kind -> (metric, name on the console) shown in the bar's postfix / the lines
KEY_METRICS = {"train": (("loss", "loss"), ("accuracy", "acc"), ("reward", "reward"),
                         ("kl", "kl")),
               "eval": (("loss", "eval_loss"), ("accuracy", "eval_acc"))}
_ORDER = [label for pairs in KEY_METRICS.values() for _, label in pairs]


# ----------------------------------------------------------------------------- console

def fmt(v) -> str:
  """A metric for the console: 4 decimals, or 4 significant digits in e-notation when tiny or
  huge."""
  if isinstance(v, float):
    if v != 0 and math.isfinite(v) and (abs(v) < 1e-3 or abs(v) >= 1e5):
      return f"{v:.3e}"
    return f"{v:.4f}"
  return str(v)


def key_metrics(kind: str, values: Mapping) -> dict:
  """{console name: value} of the key metrics a record of `kind` has (see KEY_METRICS)."""
  return {label: values[key] for key, label in KEY_METRICS.get(kind, ()) if key in values}


def line_every(total: int, log_every: int, lines: int = 10) -> int:
  """Steps between two console lines without a terminal: the multiple of `log_every` nearest
  total / lines (at least log_every), so a line falls on a logged step."""
  return log_every * max(1, round(total / (lines * log_every)))


class Console:
  """The progress of one stage's steps on stderr (see the module docstring).

    console = Console("sft", total=1000, start=0, log_every=50)
    console.step()                                  # after each step
    console.metrics("train", 50, {"loss": 2.1})     # after each log / evaluation
    console.note("warning: ...")                    # a line that must not be lost in the bar
    console.close()

  tty=None asks the stream (`isatty`); enabled=False (processes other than 0) shows nothing.
  lines_on_step: without a terminal, `step` itself prints the line every `every` steps (a
  progress with no metrics: `progress`, the samplers of collect and evaluate); `update` is `step`
  (tqdm's name).
  """

  def __init__(self, name: str, total: int, start: int, log_every: int, unit: str = "step",
               stream=None, tty: Optional[bool] = None, enabled: bool = True,
               lines_on_step: bool = False):
    self.name, self.total, self.unit, self.enabled = name, int(total), unit, enabled
    self.stream = stream if stream is not None else sys.stderr
    self.every = line_every(self.total, max(int(log_every), 1))
    self.start, self.done, self.t0 = int(start), int(start), time.time()
    self._last_line = (self.start, self.t0)     # (step, time) of the previous line: the rate
    self.postfix, self.lines_on_step = {}, lines_on_step
    self.bar = None
    is_tty = self.stream.isatty() if tty is None else tty
    if enabled and is_tty:
      self.bar = tqdm(total=self.total, initial=self.start, desc=name, unit=unit,
                      dynamic_ncols=True, file=self.stream, mininterval=1.0)

  def step(self, n: int = 1) -> None:
    before, self.done = self.done, self.done + n
    if self.bar is not None:
      self.bar.update(n)
    elif self.lines_on_step and self.enabled and (
        self.done // self.every > before // self.every or self.done == self.total):
      self._write(self.progress_line(self.done))

  update = step

  def metrics(self, kind: str, step: int, values: Mapping) -> None:
    """Keeps the key metrics of a record; the bar shows them, or a line falls due."""
    shown = key_metrics(kind, values)
    if not shown:
      return
    self.postfix.update({k: fmt(float(v)) for k, v in shown.items()})
    self.postfix = {k: self.postfix[k] for k in _ORDER if k in self.postfix}
    if self.bar is not None:
      self.bar.set_postfix(self.postfix, refresh=False)
    elif kind == "train" and self.enabled and (step % self.every == 0 or step == self.total):
      self._write(self.progress_line(step))

  def progress_line(self, step: int) -> str:
    """'<name>: <unit> <step>/<total> (<pct>%), <s> s, <rate> <unit>/s, <key metrics>': seconds
    since the start, the rate since the previous line."""
    now = time.time()
    seconds = now - self.t0
    rate = (step - self._last_line[0]) / max(now - self._last_line[1], 1e-9)
    self._last_line = (step, now)
    shown = "".join(f"{', ' if i == 0 else ' '}{k} {v}" for i, (k, v) in
                    enumerate(self.postfix.items()))
    return (f"{self.name}: {self.unit} {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"
            f", {seconds:.0f} s, {rate:.2f} {self.unit}/s{shown}")

  def note(self, line: str) -> None:
    if self.enabled:
      self._write(line)

  def _write(self, line: str) -> None:
    if self.bar is not None:
      self.bar.write(line, file=self.stream)
    else:
      self.stream.write(line + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def progress(total: int, desc: str, unit: str = "batch", enabled: bool = True) -> Console:
  """The progress of a loop without metrics over `total` items (e.g. sampler calls): a tqdm bar on
  a terminal, else a line every tenth of the way."""
  return Console(desc, total, 0, 1, unit=unit, enabled=enabled, lines_on_step=True)


def summary_line(name: str, unit: str, steps: int, seconds: float, train: Mapping,
                 evaluation: Mapping, stage_dir: str) -> str:
  """The loop's last line: what ran, the final key metrics, where the logs are."""
  shown = {**key_metrics("train", train), **key_metrics("eval", evaluation)}
  metrics = ", ".join(f"{k} {fmt(float(v))}" for k, v in shown.items())
  return (f"{name}: {steps} {unit}s in {seconds:.0f} s" + (f"; final {metrics}" if metrics else "")
          + f"; metrics in {os.path.join(stage_dir, 'metrics.jsonl')} and "
          f"{os.path.join(stage_dir, 'tensorboard')}")


# ----------------------------------------------------------------------------- W&B

def wandb_settings(config) -> Optional[dict]:
  """{project, entity, name, mode} of `config.wandb` when W&B is on (a project is set), else
  None (also for a config without the section)."""
  section = config.get("wandb") if config is not None else None
  if section is None or not section.get("project"):
    return None
  return {k: section.get(k, "") for k in WANDB_FIELDS}


def _installed(module: str) -> bool:
  """Whether `module` can be imported (without importing it)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):      # ValueError: sys.modules[module] is None (blocked)
    return False


def check_wandb_config(config) -> None:
  """config.wandb's fields are strings, mode one of WANDB_MODES, and wandb is installed when a
  project is set (a one-line UserError otherwise)."""
  section = config.get("wandb")
  if section is None:
    return
  for name in WANDB_FIELDS:
    if not isinstance(section.get(name), str):
      raise UserError(f"config.wandb.{name} must be a string, got {section.get(name)!r}")
  if section.mode not in WANDB_MODES:
    raise UserError(f"config.wandb.mode must be one of "
                    f"{', '.join(repr(m) for m in WANDB_MODES)}, got {section.mode!r}")
  if section.project and not _installed("wandb"):
    raise UserError("config.wandb.project is set but wandb is not installed "
                    "(pip install 'rlhf_jax[wandb]' or pip install wandb)")


class WandbRun:
  """One stage's W&B run (see the module docstring); every failure is one warning, then the
  run is off."""

  def __init__(self, settings: Mapping, stage: str, stage_dir: str, workdir: str,
               config: Mapping):
    self._run = None
    group = settings["name"] or os.path.basename(os.path.normpath(workdir))
    try:
      import wandb  # pylint: disable=g-import-not-at-top  (optional: only when W&B is on)
      os.makedirs(stage_dir, exist_ok=True)
      options = {"console": "off", "silent": True}
      if settings["mode"]:
        options["mode"] = settings["mode"]
      # Process-wide too: with mode 'offline' given to init() alone, wandb 0.31's own usage
      # telemetry still posts to its server.
      wandb.setup(settings=wandb.Settings(**options))
      self._run = wandb.init(
          project=settings["project"], entity=settings["entity"] or None,
          name=f"{group}-{stage}", group=group, job_type=stage, dir=stage_dir,
          config=dict(config), settings=wandb.Settings(**options))
    except Exception as e:  # pylint: disable=broad-except  (W&B must not stop training)
      self._fail("cannot start a run", e)

  @property
  def active(self) -> bool:
    return self._run is not None

  @property
  def directory(self) -> Optional[str]:
    """The run's local files (`<stage dir>/wandb/<offline-run-...>`), or None."""
    return None if self._run is None else os.path.dirname(self._run.dir)

  def _fail(self, what: str, error: Exception) -> None:
    self._run = None
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    report.warn(f"Weights & Biases: {what} ({reason}); W&B logging is off for this stage")

  def log(self, step: int, tags: Mapping[str, float]) -> None:
    if self._run is None or not tags:
      return
    try:
      self._run.log(dict(tags), step=int(step))
    except Exception as e:  # pylint: disable=broad-except
      self._fail("cannot log", e)

  def close(self) -> None:
    run, self._run = self._run, None
    if run is not None:
      try:
        run.finish()
      except Exception as e:  # pylint: disable=broad-except
        self._fail("cannot finish the run", e)


# ----------------------------------------------------------------------------- the writer

class MetricsWriter:
  """Every metrics record of a stage to metrics.jsonl, TensorBoard, W&B (when `config` turns it
  on) and the console.

  `start` > 0 (a resumed run): TensorBoard hides the steps >= start that the killed run logged
  (`report.EventWriter`'s purge_step), as metrics.jsonl was cut back to them.
  """

  def __init__(self, stage_dir: str, name: str, console: Console, primary: bool = True,
               start: int = 0, config=None, workdir: Optional[str] = None):
    self.path = os.path.join(stage_dir, "metrics.jsonl")
    self.console = console
    self._f = self._events = self._wandb = None
    if not primary:
      return
    self._f = open(self.path, "a", encoding="utf-8")
    self._events = report.EventWriter(os.path.join(stage_dir, "tensorboard"),
                                      purge_step=start or None)
    settings = wandb_settings(config)
    if settings is not None:
      self._wandb = WandbRun(settings, name, stage_dir, workdir or os.path.dirname(stage_dir),
                             config.to_dict() if hasattr(config, "to_dict") else config)

  def write(self, kind: str, step: int, values: Mapping) -> None:
    if self._f is None:
      return
    record = {"kind": kind, "step": int(step), **{k: float(v) for k, v in values.items()}}
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    tags = report.scalar_tags(record)
    self._events.scalars(int(step), tags)
    if self._wandb is not None:
      self._wandb.log(int(step), tags)
    if kind == "nonfinite":
      self.console.note(f"warning: {self.console.name}: {self.console.unit} {step} skipped "
                        f"(loss or gradient not finite; {int(record['consecutive'])} in a row)")
    else:
      self.console.metrics(kind, int(step), record)

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._events.close()
      if self._wandb is not None:
        self._wandb.close()
      self._f = None
