"""rlhf_jax.train.logs: what a stage prints (one tqdm bar on a terminal, a line every N steps
otherwise, never a line per logged step; one summary line), the metrics TensorBoard reads back,
and the optional Weights & Biases run (offline: its files hold the run's history and config).

The stage is the real loop (`loop.run_loop`) with a toy step (tests/toy_loop.py): the loss of
step s is 1 / s, an evaluation after s steps reports 2 / max(s, 1).
"""
import fcntl
import glob
import json
import os
import re
import struct
import subprocess
import sys
import termios
import time

import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import toy_loop
from rlhf_jax import config_files, pipeline
from rlhf_jax.errors import UserError
from rlhf_jax.train import logs

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_loop.py")


def _records(workdir, kind):
  with open(os.path.join(workdir, "toy", "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _interval_loss(step, log_every):
  """The logged loss at `step`: the mean of the toy's 1/s over the interval (float32 steps)."""
  return float(np.mean([np.float32(1.0 / s) for s in range(step - log_every + 1, step + 1)]))


# ----------------------------------------------------------------------------- pure helpers

def test_line_every_is_a_multiple_of_log_every_near_a_tenth():
  assert logs.line_every(100, 5) == 10
  assert logs.line_every(40, 5) == 5            # never below log_every
  assert logs.line_every(1000, 50) == 100
  assert logs.line_every(120, 1) == 12          # PPO: an iteration per log
  assert logs.line_every(7, 25) == 25


def test_key_metrics_and_format():
  train = {"loss": 0.5, "lr": 1e-4, "accuracy": 0.75, "steps_per_s": 3.0}
  assert logs.key_metrics("train", train) == {"loss": 0.5, "acc": 0.75}
  assert logs.key_metrics("train", {"reward": 0.1, "kl": 0.2, "policy_loss": 1.0}) == {
      "reward": 0.1, "kl": 0.2}
  assert logs.key_metrics("eval", {"loss": 1.0, "tokens": 9.0}) == {"eval_loss": 1.0}
  assert logs.key_metrics("nonfinite", {"total": 1.0}) == {}
  assert [logs.fmt(v) for v in (0.5, 1e-5, 2e6, 0.0, float("nan"), 3)] == [
      "0.5000", "1.000e-05", "2.000e+06", "0.0000", "nan", "3"]


# ----------------------------------------------------------------------------- console

def test_a_stage_without_a_terminal_prints_a_line_every_n_steps(tmp_path, capfd):
  """100 steps logged every 5: a progress line every 10 steps on stderr (not one per log), the
  key metrics of the last log and evaluation in it, then one summary line on stdout."""
  toy_loop.run(str(tmp_path), 100, 5, eval_every=50)
  out, err = capfd.readouterr()
  pattern = re.compile(r"^toy: step (\d+)/100 \((\d+)%\), \d+ s, [0-9.]+ step/s, loss ([0-9.]+)"
                       r"(?: eval_loss ([0-9.]+))?$")
  lines = [line for line in err.splitlines() if line.strip()]
  matches = [pattern.match(line) for line in lines]
  assert all(matches), lines
  assert [int(m[1]) for m in matches] == list(range(10, 101, 10))
  assert [int(m[2]) for m in matches] == list(range(10, 101, 10))
  for m in matches:
    assert m[3] == f"{_interval_loss(int(m[1]), 5):.4f}"
  # The evaluations at step 0 (2 / 1) and at 50 (2 / 50) show from the next line on (a step's log
  # comes before its evaluation); the one at 100 is in the summary line.
  assert [m[4] for m in matches] == ["2.0000"] * 5 + ["0.0400"] * 5
  assert "\r" not in err and "[train]" not in out + err
  assert out.splitlines() == [
      f"toy: 100 steps in {out.split(' steps in ')[1].split(' s;')[0]} s; final loss "
      f"{_interval_loss(100, 5):.4f}, eval_loss 0.0200; metrics in "
      f"{tmp_path / 'toy' / 'metrics.jsonl'} and {tmp_path / 'toy' / 'tensorboard'}"]
  # Every log interval is in metrics.jsonl and TensorBoard, though the console showed a tenth.
  train = _records(tmp_path, "train")
  assert [r["step"] for r in train] == list(range(5, 101, 5))
  acc = EventAccumulator(str(tmp_path / "toy" / "tensorboard"))
  acc.Reload()
  assert {"train/loss", "train/nonfinite", "train/steps_per_s", "eval/loss",
          "eval/eval_seconds"} == set(acc.Tags()["scalars"])
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (r["step"], np.float32(r["loss"])) for r in train]
  assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [
      (0, np.float32(2.0)), (50, np.float32(0.04)), (100, np.float32(0.02))]


def _run_on_a_terminal(workdir, *args):
  """(stdout, what the terminal got) of tests/toy_loop.py with stderr on a 120-column pty."""
  master, slave = os.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, TOY, workdir, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=slave, env=env)
  os.close(slave)
  chunks = []
  while True:
    try:
      chunk = os.read(master, 65536)
    except OSError:        # EIO: the child closed the terminal
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(master)
  out = proc.stdout.read().decode()
  assert proc.wait(timeout=120) == 0, b"".join(chunks).decode()
  return out, b"".join(chunks).decode()


def test_a_stage_on_a_terminal_shows_one_bar_and_no_step_lines(tmp_path):
  """stderr a terminal: everything written there is tqdm's redraws of ONE bar (carriage returns,
  no line per logged step in between), ending at 60/60 with the loss as its postfix; stdout has
  the one summary line."""
  out, tty = _run_on_a_terminal(str(tmp_path), 60, 5)
  frames = [f for f in re.split(r"[\r\n]+", tty) if f.strip()]
  bar = re.compile(r"^toy: +\d+%\|[^|]*\| +(\d+)/60 \[[^\]]*\]$")
  assert frames and all(bar.match(f) for f in frames), frames
  assert tty.count("\n") == 1 and tty.endswith("\n")      # the bar's own last newline only
  assert frames[-1].startswith("toy: 100%") and " 60/60 " in frames[-1]
  assert frames[-1].endswith(f"step/s, loss={_interval_loss(60, 5):.4f}]")
  assert out.splitlines()[0].startswith("toy: 60 steps in ") and len(out.splitlines()) == 1
  assert [r["step"] for r in _records(tmp_path, "train")] == list(range(5, 61, 5))


def test_a_sampler_progress_without_a_terminal_is_a_line_every_tenth(capsys):
  """collect and evaluate count sampler calls with `progress` (rollout.progress): no metrics, so
  `update` itself prints, every line_every(total, 1) calls and at the last."""
  bar = logs.progress(23, "evaluate")
  for _ in range(23):
    bar.update(1)
  bar.close()
  lines = capsys.readouterr().err.splitlines()
  got = [re.match(r"^evaluate: batch (\d+)/23 \(\d+%\), \d+ s, [0-9.]+ batch/s$", line)
         for line in lines]
  assert all(got), lines
  assert [int(m[1]) for m in got] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 23]
  quiet = logs.progress(23, "evaluate", enabled=False)
  quiet.update(23)
  assert capsys.readouterr() == ("", "")


def test_a_skipped_step_is_a_warning_line_not_lost_in_the_bar(capsys):
  console = logs.Console("sft", total=10, start=0, log_every=5, tty=False)
  writer = logs.MetricsWriter("/nonexistent", "sft", console, primary=False)
  writer.write("nonfinite", 3, {"consecutive": 1, "total": 1})   # not process 0: nothing at all
  console.note("warning: sft: step 3 skipped")
  assert capsys.readouterr().err == "warning: sft: step 3 skipped\n"
  quiet = logs.Console("sft", total=10, start=0, log_every=5, tty=False, enabled=False)
  quiet.metrics("train", 10, {"loss": 1.0})
  quiet.note("x")
  assert capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- W&B

def _wandb_records(path):
  """The records of a W&B `.wandb` file: a 7-byte header (':W&B', magic, version), then
  LevelDB-log chunks in 32 KiB blocks (u32 crc, u16 length, u8 type: 1 full, 2 first, 3 middle,
  4 last), each record a wandb_internal_pb2.Record."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  raw = open(path, "rb").read()
  assert raw[:4] == b":W&B"
  records, pending, pos, block = [], b"", 7, 32768
  while pos + 7 <= len(raw):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
    pending += raw[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
  return records


def _history(records):
  """[(step, {key: value})] of the run's history records."""
  out = []
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
      out.append((items.pop("_step"), {k: v for k, v in items.items() if not k.startswith("_")}))
  return out


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
  """wandb in offline mode with its own settings/cache folders under tmp_path."""
  pytest.importorskip("wandb")   # in the test extra; absent only outside it
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_an_offline_wandb_run_writes_the_history_and_config(tmp_path, wandb_offline, capfd):
  toy_loop.run(str(tmp_path), 20, 5, project="rlhf-jax-test", mode="offline", eval_every=10)
  runs = glob.glob(str(tmp_path / "toy" / "wandb" / "offline-run-*"))
  assert len(runs) == 1, os.listdir(tmp_path / "toy")
  files = glob.glob(os.path.join(runs[0], "run-*.wandb"))
  assert len(files) == 1
  # wandb's service process writes the file after finish() returns: wait for its last record.
  deadline = time.time() + 60
  while True:
    records = _wandb_records(files[0])
    if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
      break
    time.sleep(0.2)
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert (run.project, run.display_name, run.run_group, run.job_type) == (
      "rlhf-jax-test", "toyrun-toy", "toyrun", "toy")
  config = {i.key: json.loads(i.value_json) for i in run.config.update}
  for r in records:
    if r.WhichOneof("record_type") == "config":
      config.update({i.key: json.loads(i.value_json) for i in r.config.update})
  assert config["seed"] == 0 and config["wandb"]["project"] == "rlhf-jax-test"
  # The history is metrics.jsonl's, as TensorBoard tags, at the same steps.
  want = {}
  for r in _records(tmp_path, "train") + _records(tmp_path, "eval"):
    want.setdefault(r["step"], {}).update(
        {f"{r['kind']}/{k}": v for k, v in r.items() if k not in ("kind", "step")})
  got = {}
  for step, items in _history(records):
    got.setdefault(step, {}).update(items)
  assert sorted(got) == [0, 5, 10, 15, 20]
  for step, values in want.items():
    assert got[step] == pytest.approx(values), step
  out, err = capfd.readouterr()
  assert "wandb:" not in out + err       # wandb's own console chatter is off
  assert len(out.splitlines()) == 1


def test_wandb_is_off_by_default_and_not_imported(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)      # any import of wandb would fail
  toy_loop.run(str(tmp_path), 4, 2)
  assert not os.path.exists(tmp_path / "toy" / "wandb")
  assert logs.wandb_settings(toy_loop.config()) is None
  assert logs.wandb_settings(ml_collections.ConfigDict({"seed": 0})) is None
  assert logs.wandb_settings(toy_loop.config("p", "offline")) == {
      "project": "p", "entity": "", "name": "toyrun", "mode": "offline"}


def test_a_wandb_run_that_cannot_start_is_one_warning(tmp_path, wandb_offline, capfd,
                                                      monkeypatch):
  import wandb  # pylint: disable=g-import-not-at-top

  def refuse(**_):
    raise wandb.errors.CommError("network is unreachable\nmore detail")
  monkeypatch.setattr(wandb, "init", refuse)
  toy_loop.run(str(tmp_path), 4, 2, project="p", mode="online")
  out, err = capfd.readouterr()
  assert [line for line in err.splitlines() if not line.startswith("toy: step ")] == [
      "warning: Weights & Biases: cannot start a run (network is unreachable); W&B logging is "
      "off for this stage"]
  assert [r["step"] for r in _records(tmp_path, "train")] == [2, 4]


def test_wandb_config_is_checked(monkeypatch):
  def check(**fields):
    c = toy_loop.config()
    c.wandb.update(fields)
    logs.check_wandb_config(c)
  check(project="", mode="offline")
  with pytest.raises(UserError, match=r"^config.wandb.mode must be one of '', 'online', "
                                      r"'offline', 'disabled', got 'ofline'$"):
    check(mode="ofline")
  with pytest.raises(UserError, match=r"^config.wandb.project must be a string, got 3$"):
    logs.check_wandb_config(ml_collections.ConfigDict(
        {"wandb": {"project": 3, "entity": "", "name": "", "mode": ""}}))
  monkeypatch.setitem(sys.modules, "wandb", None)      # as if not installed
  check(project="")                                    # off: wandb not needed
  with pytest.raises(UserError, match=r"^config.wandb.project is set but wandb is not installed "
                                      r"\(pip install 'rlhf_jax\[wandb\]' or pip install wandb\)$"):
    check(project="p")


def test_every_training_config_has_the_wandb_section_off():
  want = {"project": "", "entity": "", "name": "", "mode": ""}
  for name in ("sft", "rm", "ppo_ptx"):
    c = config_files.get_config(os.path.join(ROOT, "configs", f"{name}.py"))
    assert c.wandb.to_dict() == want, name
  c = config_files.get_config(os.path.join(ROOT, "configs", "ppo_ptx.py"))
  for stage in ("pretrain", "sft", "rm"):
    assert c[stage].wandb.to_dict() == want
  # One --config.wandb.* override of the pipeline reaches every stage that trains.
  c.wandb.project, c.wandb.mode = "my-rlhf", "offline"
  for stage in pipeline.stages_of(c):
    sub = pipeline.stage_config(c, stage, "/tmp/unused")
    if stage not in ("collect", "eval"):
      assert (sub.wandb.project, sub.wandb.mode) == ("my-rlhf", "offline"), stage


@pytest.mark.slow
def test_wandb_errors_on_the_command_line_are_one_line(tmp_path):
  """A wrong mode, and a project without wandb installed: exit 2, one line, nothing written."""
  block = ("import sys, runpy; sys.modules['wandb'] = None; sys.argv[0] = 'rlhf_jax.main'; "
           "runpy.run_module('rlhf_jax.main', run_name='__main__')")
  cases = [
      ([sys.executable, "-m", "rlhf_jax.main", "--config=configs/sft.py:tiny",
        "--config.wandb.mode=onlin"], "error: config.wandb.mode must be one of"),
      ([sys.executable, "-c", block, "--config=configs/ppo_ptx.py",
        "--config.wandb.project=p"], "error: config.wandb.project is set but wandb is not "
                                     "installed (pip install 'rlhf_jax[wandb]'"),
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(args + [f"--workdir={tmp_path / str(i)}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, (args, _) in enumerate(cases)]
  for i, (proc, (_, message)) in enumerate(zip(procs, cases)):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert not os.path.exists(tmp_path / str(i))


def test_offline_wandb_makes_no_network_connection(tmp_path):
  """`import wandb` and a stage's offline W&B run (config.wandb.mode 'offline', no WANDB_MODE in
  the environment) in a Python process whose sockets may reach only this machine (unix sockets,
  loopback): every other connect or name lookup is recorded (and refused), and there must be
  none. (wandb 0.31 given mode='offline' in init() alone still looks up and posts to its
  telemetry server, api.forge.coreweave.com: `logs.WandbRun` sets the mode process-wide.)"""
  pytest.importorskip("wandb")
  guard = r"""
import atexit, socket, sys, time
LOCAL = ("127.0.0.1", "::1", "localhost", None)
ATTEMPTS = []
atexit.register(lambda: print("ATTEMPTS", ATTEMPTS, flush=True))   # last: after wandb's own
def _local(address):
  return not isinstance(address, tuple) or address[0] in LOCAL
_connect = socket.socket.connect
def connect(self, address):
  if not _local(address):
    ATTEMPTS.append(("connect", str(address)))
    raise OSError(f"network access to {address}")
  return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: connect(self, address) or 0
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
  if host not in LOCAL:
    ATTEMPTS.append(("lookup", str(host)))
    raise OSError(f"name lookup of {host}")
  return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
t0 = time.time()
import wandb
print(f"import wandb: {time.time() - t0:.2f} s")
from rlhf_jax.train import logs
run = logs.WandbRun({"project": "p", "entity": "", "name": "n", "mode": "offline"}, "sft",
                    sys.argv[1], sys.argv[1], {"seed": 0})
assert run.active
run.log(1, {"train/loss": 0.5})
run.close()
print(f"total: {time.time() - t0:.2f} s")
"""
  env = dict(os.environ, WANDB_CONFIG_DIR=str(tmp_path / "config"),
             WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_DATA_DIR=str(tmp_path / "data"))
  for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ERROR_REPORTING"):
    env.pop(name, None)
  result = subprocess.run([sys.executable, "-c", guard, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == "ATTEMPTS []", result.stdout
  assert result.stdout.startswith("import wandb: ")
  assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))) == 1
