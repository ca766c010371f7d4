"""Reports of a run: TensorBoard event files, metrics.jsonl curves as PNG, markdown result tables.

Pure helpers with no JAX: safe to import anywhere, and to call on process 0 only (the caller
decides; nothing here talks to other processes).

  EventWriter(logdir)          TensorBoard scalars (tensorboardX's SummaryWriter; no TensorFlow).
                               An unwritable logdir costs one warning, never the run.
  read_metrics(path)           the records of a stage's `metrics.jsonl`; a truncated line left by a
                               killed run is dropped.
  curves(records, key)         {kind: (steps, values)} of one metric, by step, last write wins.
  plot_curves(series, keys, out_png, title)   one PNG, a panel per metric, a line per run.
  plot_overoptimisation(runs, out_png, ...)   gold and RM score against sqrt(KL to SFT): PPO
                                              runs, best-of-N points, final policies.
  markdown_table(rows, columns)               a results table in markdown.
  export_tensorboard(metrics_path, logdir)    a finished run's metrics.jsonl as event files.

TensorBoard tags are `<kind>/<metric>` (e.g. `train/loss`, `eval/accuracy`); `scalar_tags` makes
them from a metrics record, so live logging and `export_tensorboard` name curves the same way.
"""
import itertools
import json
import math
import numbers
import os
import sys
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from rlhf_jax.errors import UserError

_RESERVED = ("kind", "step")
_file_counter = itertools.count()


def warn(message: str) -> None:
  sys.stderr.write(f"warning: {message}\n")
  sys.stderr.flush()


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- TensorBoard

class EventWriter:
  """TensorBoard scalars through tensorboardX's `SummaryWriter`, in
  `<logdir>/events.out.tfevents.<time>.<host>.<pid>.<n>` (the suffix keeps two writers of one
  directory apart).

  `scalars(step, {tag: value})` adds every numeric value with `add_scalar` at one wall time;
  SummaryWriter queues the events and its thread writes them, flushing every `flush_secs`
  seconds; `flush()` flushes what was written and `close()` writes everything. `purge_step`
  (a run resumed at that step): TensorBoard hides this directory's older events at steps >=
  purge_step, those a killed run wrote after its last checkpoint.

  Logging never stops or blocks training: if the logdir cannot be created, or writing fails
  later (a full disk; also inside SummaryWriter's thread, whose failures are caught so its queue
  keeps draining), or tensorboardX is missing, ONE warning goes to stderr and every later call is
  a no-op.
  """

  def __init__(self, logdir: str, purge_step: Optional[int] = None, flush_secs: int = 5):
    self.logdir = logdir
    self._writer = None
    self._failed = None       # the first error of SummaryWriter's writing thread
    self._warned = False
    try:
      # Here, not at the top: tensorboardX imports torch when it is installed (seconds), which
      # only a process that logs should pay.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=flush_secs,
                                   filename_suffix=f".{os.getpid()}.{next(_file_counter)}")
      # pylint: disable-next=protected-access
      self._events = self._writer.file_writer.event_writer._ev_writer
    except (OSError, ImportError) as e:
      self._writer = None
      self._disable(e)
      return
    # The record writer is shared by SummaryWriter's thread and flush(): an error there is kept
    # for the next call instead of killing the thread (whose full queue would then block add_*).
    for name in ("write_event", "flush", "close"):
      setattr(self._events, name, self._guarded(getattr(self._events, name), name == "close"))

  def _guarded(self, fn, always=False):
    def call(*args):
      if self._failed is not None and not always:
        return None
      try:
        return fn(*args)
      except OSError as e:
        self._failed = self._failed or e
        return None
    return call

  @property
  def active(self) -> bool:
    """False once writing failed (or after close): later calls do nothing."""
    return self._writer is not None and self._failed is None

  @property
  def path(self) -> Optional[str]:
    """The event file being written, or None."""
    return self._events._file_name if self.active else None  # pylint: disable=protected-access

  def _disable(self, error: Exception) -> None:
    writer, self._writer = self._writer, None
    if writer is not None:
      try:
        writer.close()
      except OSError:
        pass
    if self._warned:
      return
    self._warned = True
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    warn(f"TensorBoard logdir {self.logdir}: cannot write event files ({reason}); "
          "TensorBoard logging is off for this run")

  def _check(self) -> bool:
    """Whether the writer is still on (disabling it, with the warning, after a failure)."""
    if self._writer is not None and self._failed is not None:
      self._disable(self._failed)
    return self._writer is not None

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Adds a scalar per (tag, value) at `step`, all at one wall time; non-numbers are skipped."""
    if not self._check():
      return
    now = time.time()
    try:
      for tag, v in values.items():
        if _is_number(v):
          self._writer.add_scalar(str(tag), float(v), global_step=int(step), walltime=now)
    except OSError as e:
      self._disable(e)

  def flush(self) -> None:
    if self._check():
      self._writer.flush()
      self._check()

  def close(self) -> None:
    """Writes every queued event and closes the file (a failure is the one warning)."""
    if not self._check():
      return
    writer, self._writer = self._writer, None
    try:
      writer.close()
    except OSError as e:
      self._failed = e
    if self._failed is not None:
      self._disable(self._failed)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def scalar_tags(record: Mapping) -> dict:
  """{'<kind>/<metric>': value} for the numeric fields of a metrics record (not kind/step)."""
  kind = record.get("kind", "metrics")
  return {f"{kind}/{k}": float(v) for k, v in record.items()
          if k not in _RESERVED and _is_number(v)}


# ----------------------------------------------------------------------------- metrics.jsonl

def _parse_line(line: str):
  """A record from one line; a line where a killed write was followed by a resumed run's record
  (`{"kind": "tr{"kind": ...}`) yields the complete record after the cut. None if unparsable."""
  try:
    return json.loads(line)
  except ValueError:
    pass
  cut = line.rfind('{"kind"')
  if cut > 0:
    try:
      return json.loads(line[cut:])
    except ValueError:
      pass
  return None


def read_metrics(path: str) -> list:
  """The records of a `metrics.jsonl` (one JSON object per line), in file order.

  Blank lines are ignored and an unparsable LAST line (a run killed mid-write) is dropped. Any
  other unparsable line, or a line that is not a JSON object, is a UserError naming path:line.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except FileNotFoundError:
    raise UserError(f"{path}: no such metrics file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read metrics ({e})") from None
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  records = []
  for n, (lineno, line) in enumerate(numbered):
    record = _parse_line(line)
    if record is None:
      if n == len(numbered) - 1:
        break          # truncated by a kill
      raise UserError(f"{path}:{lineno}: not valid JSON ({line[:60]!r})")
    if not isinstance(record, dict):
      raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    records.append(record)
  return records


def _split_key(records: Sequence[Mapping], key: str):
  """'kind/name' restricts to records of that kind when such records exist; else a plain name."""
  if "/" in key:
    kind, name = key.split("/", 1)
    if any(r.get("kind") == kind for r in records):
      return kind, name
  return None, key


def curves(records: Sequence[Mapping], key: str) -> dict:
  """{kind: (steps, values)} of metric `key` ('loss', or 'eval/loss' for one kind).

  Records without an integer step or a numeric value for the metric are skipped; a step logged
  twice (a resumed run repeats steps after its last checkpoint) keeps the LAST record; steps ascend.
  """
  want_kind, name = _split_key(records, key)
  by_kind = {}
  for r in records:
    kind = r.get("kind", "metrics")
    if want_kind is not None and kind != want_kind:
      continue
    step, value = r.get("step"), r.get(name)
    if not _is_number(step) or not _is_number(value):
      continue
    by_kind.setdefault(kind, {})[int(step)] = float(value)
  return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_kind.items()}


# ----------------------------------------------------------------------------- plots

def plot_curves(series: Mapping[str, Union[str, Sequence[Mapping]]], keys: Sequence[str],
                out_png: str, title: str = "", *, ncols: int = 3,
                panel_size: tuple = (4.0, 3.0), dpi: int = 100) -> dict:
  """Writes ONE PNG: a panel per metric in `keys`, a line per run label in `series`.

  `series` maps a label (e.g. 'ppo', 'ppo_ptx') to a metrics.jsonl path (or its records). A key is
  a metric name or 'kind/metric' (see `curves`); when a run logs the metric under several kinds,
  each gets its own line, labelled 'label (kind)'. Runs without a key are skipped; a panel with no
  data says so. The image is min(ncols, len(keys)) x ceil(len(keys)/ncols) panels of `panel_size`
  inches at `dpi`: exactly that many pixels. Written to a temporary file and renamed into place.

  Returns {key: [line labels drawn]}.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  keys = list(keys)
  if not keys:
    raise UserError("plot_curves: keys is empty (name at least one metric to plot)")
  data = {label: read_metrics(src) if isinstance(src, (str, os.PathLike)) else list(src)
          for label, src in series.items()}
  cols = max(1, min(ncols, len(keys)))
  rows = math.ceil(len(keys) / cols)
  fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), dpi=dpi)
  FigureCanvasAgg(fig)
  drawn = {}
  for i, key in enumerate(keys):
    ax = fig.add_subplot(rows, cols, i + 1)
    drawn[key] = []
    for label, records in data.items():
      found = curves(records, key)
      for kind, (steps, values) in found.items():
        name = label if len(found) == 1 else f"{label} ({kind})"
        ax.plot(steps, values, label=name, marker="." if len(steps) < 20 else None)
        drawn[key].append(name)
    _finish_axes(ax, key, "step", drawn[key])
  _save(fig, title, out_png, dpi)
  return drawn


def _finish_axes(ax, title, xlabel, drawn):
  """Title, x label, grid, and a legend of what was drawn (or 'no data')."""
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(True, alpha=0.3)
  if drawn:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _save(fig, title, out_png, dpi):
  """The figure with its title, laid out, written to a temporary file and renamed into place."""
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  tmp = f"{out_png}.tmp.{os.getpid()}.png"
  try:
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, out_png)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def kl_curve(records: Sequence[Mapping]) -> dict:
  """{'steps', 'kl', 'gold_score', 'reward'} of a PPO run's metrics records, by step (the 'train'
  records when there are any): the steps that logged a numeric 'kl', with None where a step has
  no 'gold_score' or 'reward'."""
  records = list(records)
  prefix = "train/" if any(r.get("kind") == "train" for r in records) else ""
  by_key = {}
  for name in ("kl", "gold_score", "reward"):
    found = curves(records, prefix + name)
    steps, values = next(iter(found.values())) if found else ([], [])
    by_key[name] = dict(zip(steps, values))
  steps = sorted(by_key["kl"])
  return {"steps": steps, "kl": [by_key["kl"][s] for s in steps],
          "gold_score": [by_key["gold_score"].get(s) for s in steps],
          "reward": [by_key["reward"].get(s) for s in steps]}


def _sqrt_kl(kl: float) -> float:
  """sqrt of a KL estimate; a Monte-Carlo estimate slightly below 0 is 0."""
  return math.sqrt(max(float(kl), 0.0))


def plot_overoptimisation(runs: Mapping[str, Union[str, Sequence[Mapping]]], out_png: str, *,
                          best_of_n: Optional[Mapping[str, Sequence[tuple]]] = None,
                          finals: Optional[Mapping[str, tuple]] = None,
                          rm_free: Sequence[str] = (), smooth: int = 1,
                          title: str = "Gold vs reward-model score against KL to SFT",
                          panel_size: tuple = (5.0, 3.8), dpi: int = 100) -> dict:
  """Writes ONE PNG of two panels, gold score and RM score against sqrt(KL to SFT) in nats
  (Gao et al. 2022, figure 1: the RM score keeps rising with KL while the gold score peaks).

  runs       {label: metrics.jsonl path or records} of PPO runs: a line over their iterations
             (`kl_curve`: the rollout's mean KL, 'gold_score' and 'reward' = the RM score).
  best_of_n  {label: [(kl, gold, rm), ...]} points joined by a dashed line (e.g. N = 1, 4, 16).
  finals     {label: (kl, gold, rm)} markers (the evaluated policies).
  rm_free    labels of runs whose 'reward' is not the reward model's score (the gold-reward
             oracle): drawn in the gold panel only.
  smooth     a run's line is the running mean of its last `smooth` iterations (x and y alike;
             one PPO rollout's KL and scores are noisy).
  A None value is skipped. Written to a temporary file and renamed into place.

  Returns {'gold': [labels drawn], 'rm': [labels drawn]}.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  data = {label: kl_curve(read_metrics(src) if isinstance(src, (str, os.PathLike)) else src)
          for label, src in runs.items()}
  fig = Figure(figsize=(panel_size[0] * 2, panel_size[1]), dpi=dpi)
  FigureCanvasAgg(fig)
  drawn = {}
  colors = {}

  def color(label):
    if label not in colors:
      colors[label] = f"C{len(colors) % 10}"
    return colors[label]

  for i, (panel, key, column) in enumerate((("gold", "gold_score", 1), ("rm", "reward", 2))):
    ax = fig.add_subplot(1, 2, i + 1)
    drawn[panel] = []
    for label, curve in data.items():
      if panel == "rm" and label in rm_free:
        continue
      xy = [(_sqrt_kl(k), v) for k, v in zip(curve["kl"], curve[key]) if _is_number(v)]
      if xy and smooth > 1:
        xy = [tuple(np.mean(xy[max(0, j - smooth + 1):j + 1], axis=0)) for j in range(len(xy))]
      if xy:
        ax.plot(*zip(*xy), label=label, color=color(label), alpha=0.8,
                marker="." if len(xy) < 20 else None)
        drawn[panel].append(label)
    for label, points in (best_of_n or {}).items():
      xy = [(_sqrt_kl(p[0]), p[column]) for p in points
            if p[0] is not None and _is_number(p[column])]
      if xy:
        ax.plot(*zip(*xy), label=label, color=color(label), linestyle="--", marker="s",
                markersize=4)
        drawn[panel].append(label)
    for label, point in (finals or {}).items():
      if point[0] is None or not _is_number(point[column]):
        continue
      ax.plot([_sqrt_kl(point[0])], [point[column]], linestyle="none", marker="*",
              markersize=11, color=color(label), markeredgecolor="black",
              label=f"{label} (final)")
      drawn[panel].append(f"{label} (final)")
    _finish_axes(ax, "gold score" if panel == "gold" else "reward-model score",
                 "sqrt(KL to SFT)  (nats^0.5)", drawn[panel])
  _save(fig, title, out_png, dpi)
  return drawn


# ----------------------------------------------------------------------------- tables

Column = Union[tuple, list]
Formatter = Union[None, str, Callable[[object], str]]


def _cell(value, fmt: Formatter, missing: str) -> str:
  if value is None:
    return missing
  if fmt is None:
    text = str(value)
  elif callable(fmt):
    text = fmt(value)
  else:
    text = format(value, fmt)
  return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping], columns: Sequence[Column], missing: str = "-") -> str:
  """A markdown table: one line per row, one column per (header, key[, fmt]).

  fmt is a format spec ('.3f', 'd', '.1%'), a callable value -> str, or None (str). A missing key
  or None prints `missing`. Columns whose present values are all numbers are right-aligned.
  '|' inside a cell is escaped and newlines become spaces. Ends with a newline.
  """
  rows = list(rows)
  specs = []
  for c in columns:
    if not isinstance(c, (tuple, list)) or len(c) not in (2, 3):
      raise UserError(f"markdown_table: column {c!r} must be (header, key) or (header, key, fmt)")
    specs.append((str(c[0]), c[1], c[2] if len(c) == 3 else None))
  lines = ["| " + " | ".join(h.replace("|", "\\|") for h, _, _ in specs) + " |"]
  aligns = []
  for _, key, _ in specs:
    present = [r.get(key) for r in rows if r.get(key) is not None]
    aligns.append("---:" if present and all(_is_number(v) for v in present) else "---")
  lines.append("|" + "|".join(aligns) + "|")
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(key), fmt, missing) for _, key, fmt in specs)
                 + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- export

def export_tensorboard(metrics_path: str, logdir: str) -> int:
  """Writes every record of a metrics.jsonl as TensorBoard scalars (`scalar_tags`); the count."""
  records = read_metrics(metrics_path)
  n = 0
  with EventWriter(logdir) as writer:
    for r in records:
      if _is_number(r.get("step")) and (tags := scalar_tags(r)):
        writer.scalars(int(r["step"]), tags)
        n += 1
  return n
