"""rlhf_jax.report: event files read back by TensorBoard's own reader (EventAccumulator: tags,
steps, values; a resumed run's purge), writing that never stops training, metrics.jsonl reading of
killed and resumed runs, PNG size (the curves and the over-optimisation plot), exact table text."""
import glob
import json
import math
import os
import struct
import threading
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_jax import report
from rlhf_jax.errors import UserError


def _scalars(path):
  """{tag: [(step, value, wall_time)]} as TensorBoard reads the event file(s) at `path` (a
  directory or one file)."""
  acc = EventAccumulator(str(path))
  acc.Reload()
  return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


def _steps_values(path):
  return {tag: [(s, v) for s, v, _ in events] for tag, events in _scalars(path).items()}


def _same(got, want):
  """float32 equality, NaN equal to NaN."""
  return (math.isnan(got) and math.isnan(want)) or got == np.float32(want)


# ----------------------------------------------------------------------------- EventWriter

def test_event_writer_round_trip(tmp_path, capsys):
  logdir = str(tmp_path / "tb" / "sft")
  written = {3: {"train/loss": 2.5, "train/lr": 1e-4}, 7: {"eval/accuracy": 0.625, "n": 3},
             11: {"train/loss": float("nan"), "skipped": "text", "flag": True}}
  t0 = time.time()
  with report.EventWriter(logdir) as w:
    assert w.active and w.path.startswith(os.path.join(logdir, "events.out.tfevents."))
    for step, values in written.items():
      w.scalars(step, values)
  assert not w.active and w.path is None
  w.scalars(12, {"late": 1.0})          # after close: a no-op, not an error
  w.flush()
  got = _scalars(logdir)
  assert set(got) == {"train/loss", "train/lr", "eval/accuracy", "n"}
  assert [s for s, _, _ in got["train/loss"]] == [3, 11]
  for tag, events in got.items():
    want = [(step, values[tag]) for step, values in written.items() if tag in values]
    assert [s for s, _, _ in events] == [s for s, _ in want]
    assert all(_same(v, x) for (_, v, _), (_, x) in zip(events, want)), (tag, events)
    assert all(t0 - 1 <= t <= time.time() + 1 for _, _, t in events)
  # One wall time per step: the tags of a step are one point in time.
  assert got["train/loss"][0][2] == got["train/lr"][0][2]
  assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1
  assert capsys.readouterr().err == ""


def test_events_reach_the_file_while_the_writer_is_open(tmp_path):
  """A running stage's curves show in TensorBoard: the writer's thread flushes every flush_secs
  seconds, without close()."""
  w = report.EventWriter(str(tmp_path), flush_secs=1)
  for step in range(5):
    w.scalars(step, {"train/loss": 1.0 / (step + 1)})
  w.flush()
  deadline = time.time() + 30
  while time.time() < deadline and len(_steps_values(tmp_path).get("train/loss", [])) < 5:
    time.sleep(0.2)
  got = _steps_values(tmp_path)["train/loss"]
  w.close()
  assert got == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]


def test_two_writers_in_one_directory_keep_both_files(tmp_path):
  a, b = report.EventWriter(str(tmp_path)), report.EventWriter(str(tmp_path))
  a.scalars(1, {"x": 1.0})
  b.scalars(1, {"x": 2.0})
  a.close()
  b.close()
  files = sorted(glob.glob(str(tmp_path / "events.out.tfevents.*")))
  assert len(files) == 2
  assert sorted(_steps_values(f)["x"][0][1] for f in files) == [1.0, 2.0]


def test_a_resumed_writer_hides_what_the_killed_run_wrote_after_its_checkpoint(tmp_path):
  """A run killed after step 9 and resumed from its checkpoint at step 6 logs 6.. again: with
  purge_step=6 TensorBoard shows the first run's steps 0..5 and the resumed run's 6..9 only."""
  with report.EventWriter(str(tmp_path)) as first:
    for step in range(10):
      first.scalars(step, {"train/loss": float(step)})
  time.sleep(1.1)       # event file names start with the second they were created
  with report.EventWriter(str(tmp_path), purge_step=6) as resumed:
    for step in range(6, 10):
      resumed.scalars(step, {"train/loss": 100.0 + step})
  assert _steps_values(tmp_path)["train/loss"] == (
      [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 10)])


def test_unwritable_logdir_warns_once_and_never_raises(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  w = report.EventWriter(str(blocker / "tb"))
  assert not w.active and w.path is None
  for step in range(3):
    w.scalars(step, {"loss": 1.0})
  w.flush()
  w.close()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: TensorBoard logdir ") and "tb" in err[0]


def test_write_failure_mid_run_warns_once_and_never_blocks(tmp_path, capsys):
  """The disk fills up under SummaryWriter's writing thread: the thread keeps draining its queue
  (a dead one would leave add_scalar blocked on a full queue), the next call warns once, and
  every later call returns at once."""
  w = report.EventWriter(str(tmp_path), flush_secs=1)
  w.scalars(1, {"loss": 1.0})
  w.flush()

  def full(_):
    raise OSError(28, "No space left on device")
  w._events._py_recordio_writer.write = full        # pylint: disable=protected-access

  def log_a_lot():
    for step in range(2, 200):
      w.scalars(step, {f"m{i}": 1.0 for i in range(20)})   # 20 x the writer's queue
      time.sleep(0.001)
    w.flush()
    w.close()
  worker = threading.Thread(target=log_a_lot, daemon=True)
  worker.start()
  worker.join(timeout=120)
  assert not worker.is_alive(), "logging blocked after a write failure"
  assert not w.active
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device" in err[0], err
  assert err[0].startswith("warning: TensorBoard logdir ")


def test_export_tensorboard(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"kind": "eval", "step": 0, "loss": 3.0},
          {"kind": "train", "step": 25, "loss": 2.0, "lr": 0.001},
          {"kind": "note", "text": "no step"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert report.export_tensorboard(str(path), str(tmp_path / "tb")) == 2
  assert _steps_values(tmp_path / "tb") == {
      "eval/loss": [(0, 3.0)], "train/loss": [(25, 2.0)],
      "train/lr": [(25, pytest.approx(0.001))]}


# ----------------------------------------------------------------------------- metrics.jsonl

def _write_lines(path, lines):
  path.write_text("\n".join(lines))
  return str(path)


def test_read_metrics_drops_a_truncated_last_line(tmp_path):
  good = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2)]
  path = _write_lines(tmp_path / "m.jsonl",
                      [json.dumps(r) for r in good] + ['{"kind": "train", "step": 3, "lo'])
  assert report.read_metrics(path) == good
  # Also with a trailing newline and blank lines.
  path = _write_lines(tmp_path / "n.jsonl", [json.dumps(good[0]), "", json.dumps(good[1]), ""])
  assert report.read_metrics(path) == good


def test_read_metrics_recovers_a_killed_then_resumed_line(tmp_path):
  resumed = {"kind": "train", "step": 2, "loss": 0.5}
  path = _write_lines(tmp_path / "m.jsonl", [
      json.dumps({"kind": "train", "step": 1, "loss": 1.0}),
      '{"kind": "train", "step": 2, "lo' + json.dumps(resumed),
      json.dumps({"kind": "eval", "step": 2, "loss": 0.7})])
  assert [r["step"] for r in report.read_metrics(path)] == [1, 2, 2]
  assert report.read_metrics(path)[1] == resumed


def test_read_metrics_errors_name_the_line(tmp_path):
  path = _write_lines(tmp_path / "m.jsonl", ['{"kind": "train", "step": 1}', "garbage", "{}"])
  with pytest.raises(UserError, match=r"m\.jsonl:2: not valid JSON"):
    report.read_metrics(path)
  path = _write_lines(tmp_path / "a.jsonl", ["[1, 2]", "{}"])
  with pytest.raises(UserError, match=r"a\.jsonl:1: expected a JSON object, got list"):
    report.read_metrics(path)
  with pytest.raises(UserError, match="no such metrics file"):
    report.read_metrics(str(tmp_path / "missing.jsonl"))


def test_curves_match_a_brute_force_reference():
  rng = np.random.default_rng(0)
  records = []
  for _ in range(200):
    r = {"kind": str(rng.choice(["train", "eval"])), "step": int(rng.integers(0, 30))}
    if rng.random() < 0.8:
      r["loss"] = float(rng.normal())
    records.append(r)
  records.append({"kind": "train", "loss": 1.0})                 # no step: skipped
  records.append({"kind": "train", "step": 5, "loss": "n/a"})    # not a number: skipped
  for key, kinds in (("loss", ("train", "eval")), ("eval/loss", ("eval",))):
    got = report.curves(records, key)
    for kind in kinds:
      last = {}
      for r in records:                    # brute force: the last numeric value per step
        if r["kind"] == kind and "step" in r and isinstance(r.get("loss"), float):
          last[r["step"]] = r["loss"]
      assert got[kind] == (sorted(last), [last[s] for s in sorted(last)])
    assert set(got) == set(kinds)
  assert report.curves(records, "reward") == {}
  # 'a/b' is a plain metric name when no record has kind 'a'.
  assert report.curves([{"kind": "train", "step": 1, "a/b": 2.0}], "a/b") == {"train": ([1], [2.0])}


# ----------------------------------------------------------------------------- plots

def _png_size(path):
  raw = open(path, "rb").read()
  assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
  return struct.unpack(">II", raw[16:24])


def test_plot_curves_writes_one_png_of_the_right_size(tmp_path):
  def run(ptx):
    rows = []
    for s in range(0, 50, 5):
      r = {"kind": "train", "step": s, "reward": s / 50, "kl": 0.01 * s}
      if ptx:
        r["ptx_loss"] = 3.0 - s / 50
      rows.append(r)
      rows.append({"kind": "eval", "step": s, "reward": s / 60})
    return rows
  paths = {}
  for label, ptx in (("ppo", False), ("ppo_ptx", True)):
    p = tmp_path / label / "metrics.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps(r) + "\n" for r in run(ptx)))
    paths[label] = str(p)
  out = str(tmp_path / "plots" / "curves.png")
  drawn = report.plot_curves(paths, ["train/reward", "kl", "ptx_loss", "eval/reward", "win_rate"],
                             out, "PPO vs PPO-ptx")
  assert drawn == {"train/reward": ["ppo", "ppo_ptx"], "kl": ["ppo", "ppo_ptx"],
                   "ptx_loss": ["ppo_ptx"], "eval/reward": ["ppo", "ppo_ptx"], "win_rate": []}
  assert _png_size(out) == (3 * 400, 2 * 300)
  assert os.path.getsize(out) > 5000
  assert os.listdir(tmp_path / "plots") == ["curves.png"]      # no temporary left behind
  # A metric logged under two kinds gets a line per kind; records can be passed directly.
  drawn = report.plot_curves({"ppo": report.read_metrics(paths["ppo"])}, ["reward"], out,
                             panel_size=(5.0, 2.0), dpi=50)
  assert drawn == {"reward": ["ppo (train)", "ppo (eval)"]}
  assert _png_size(out) == (250, 100)


def test_overoptimisation_plot_from_synthetic_metrics(tmp_path):
  ppo = [{"kind": "train", "step": s, "kl": 0.5 * s - 0.01, "reward": 0.3 * s,
          "gold_score": 0.5 + 0.1 * s - 0.03 * s * s} for s in range(5)]
  ppo.insert(2, {"kind": "eval", "step": 1, "kl": 99.0, "reward": 99.0})   # not the rollout's
  ppo.append({"kind": "train", "step": 5, "kl": 2.4, "reward": 1.4})      # no gold score
  path = tmp_path / "ppo" / "metrics.jsonl"
  path.parent.mkdir()
  path.write_text("".join(json.dumps(r) + "\n" for r in ppo) + '{"kind": "tra')   # killed
  curve = report.kl_curve(report.read_metrics(str(path)))
  assert curve["steps"] == [0, 1, 2, 3, 4, 5]
  assert curve["kl"] == pytest.approx([-0.01, 0.49, 0.99, 1.49, 1.99, 2.4])
  assert curve["reward"] == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.2, 1.4])
  assert curve["gold_score"][:5] == pytest.approx([0.5, 0.57, 0.58, 0.53, 0.42])
  assert curve["gold_score"][5] is None
  oracle = [{"step": s, "kl": 0.2 * s, "reward": 0.1 * s, "gold_score": 0.1 * s}
            for s in range(3)]        # no 'kind': every record counts
  assert report.kl_curve(oracle)["steps"] == [0, 1, 2]
  out = str(tmp_path / "plots" / "overoptimisation.png")
  drawn = report.plot_overoptimisation(
      {"ppo": str(path), "ppo_oracle": oracle}, out,
      best_of_n={"best-of-N by RM": [(0.0, 0.5, 0.0), (math.log(4) - 0.75, 0.6, 0.8)]},
      finals={"ppo": (2.4, 0.4, 1.4), "base": (None, None, None), "sft": (0.0, 0.5, None)},
      rm_free=("ppo_oracle",))
  assert drawn == {"gold": ["ppo", "ppo_oracle", "best-of-N by RM", "ppo (final)", "sft (final)"],
                   "rm": ["ppo", "best-of-N by RM", "ppo (final)"]}
  assert _png_size(out) == (1000, 380)
  assert os.path.getsize(out) > 5000
  assert os.listdir(tmp_path / "plots") == ["overoptimisation.png"]
  # Nothing to draw still writes the figure (each panel says "no data").
  assert report.plot_overoptimisation({}, out, dpi=50) == {"gold": [], "rm": []}
  assert _png_size(out) == (500, 190)


def test_plot_curves_needs_a_key(tmp_path):
  with pytest.raises(UserError, match="keys is empty"):
    report.plot_curves({}, [], str(tmp_path / "x.png"))


# ----------------------------------------------------------------------------- tables

def test_markdown_table_exact_text():
  rows = [{"run": "sft", "reward": 0.1234, "win": 0.5, "steps": 400},
          {"run": "ppo|ptx", "reward": -1.5, "steps": 1200, "note": "a\nb"}]
  text = report.markdown_table(rows, [("run", "run"), ("reward", "reward", ".3f"),
                                      ("win rate", "win", ".1%"), ("steps", "steps", "d"),
                                      ("note", "note"), ("x2", "reward", lambda v: f"{2 * v:g}")])
  assert text == (
      "| run | reward | win rate | steps | note | x2 |\n"
      "|---|---:|---:|---:|---|---:|\n"
      "| sft | 0.123 | 50.0% | 400 | - | 0.2468 |\n"
      "| ppo\\|ptx | -1.500 | - | 1200 | a b | -3 |\n")
  assert report.markdown_table([], [("a", "a")], missing="n/a") == "| a |\n|---|\n"
  with pytest.raises(UserError, match="column 'a' must be"):
    report.markdown_table(rows, ["a"])


def test_scalar_tags():
  records = [{"kind": "eval", "step": 0, "loss": 3.0}, {"kind": "train", "step": 1, "loss": 2.0},
             {"kind": "eval", "step": 2, "loss": 1.0, "ok": True}]
  assert report.scalar_tags(records[2]) == {"eval/loss": 1.0}
