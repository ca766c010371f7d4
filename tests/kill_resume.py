r"""Kill-and-resume harness: SIGKILL a training command mid-run, re-run it, compare bit for bit.

A stage command (`python -m rlhf_jax.main --config=... --workdir={workdir} ...`) is run three ways:

  reference   once to completion in its own workdir;
  killed      in a second workdir, SIGKILLed at a seeded random point after its first complete
              checkpoint exists (or, with `during_save=True`, the moment orbax's temporary
              checkpoint directory `<step>.orbax-checkpoint-tmp-*` appears: mid async save);
  resumed     the SAME command again in the second workdir, to completion.

The final models `<workdir>/<stage>/model` of the reference and the resumed run must be equal
bit for bit (`assert_same_params`). The PPO stage uses the same harness.

From Python (tests/test_resume.py):

  ref = run_to_completion(cmd, ref_dir)
  report = kill_and_resume(cmd, work_dir, stage="sft", seed=3)
  assert_same_params(model_dir(ref_dir, "sft"), model_dir(work_dir, "sft"))

From the shell (both workdirs are made under --root):

  python tests/kill_resume.py --stage=sft --root=/tmp/kr --seed=0 [--during_save] -- \
      -m rlhf_jax.main --config=configs/sft.py:tiny --workdir={workdir} --config.num_steps=30

`{workdir}` in the command is replaced by each run's workdir; the command runs under the current
Python interpreter with the current environment (set XLA_FLAGS etc. there).
"""
import argparse
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"


@dataclasses.dataclass
class KillReport:
  """What happened to the killed run."""
  killed: bool              # SIGKILL was sent while the process was still running
  complete_steps: list      # complete checkpoint steps on disk right after the kill
  tmp_dirs: list            # orbax tmp directories on disk right after the kill (interrupted save)
  delay_s: float            # the random delay after the trigger
  model_existed: bool       # the final model was already written when the kill landed
  resume_output: str = ""   # stdout of the resumed run
  attempts: int = 1         # runs started (during_save retries a kill that missed the save)


def model_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "model")


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "checkpoints")


def _argv(cmd: Sequence[str], workdir: str):
  return [sys.executable] + [a.replace("{workdir}", workdir) for a in cmd]


def _env(env: Optional[dict]):
  out = dict(os.environ)
  out.update(env or {})
  return out


def run_to_completion(cmd: Sequence[str], workdir: str, env: Optional[dict] = None,
                      timeout: float = 600) -> str:
  """Runs the command to the end; returns its stdout; a non-zero exit is an AssertionError with
  the end of stderr."""
  result = subprocess.run(_argv(cmd, workdir), cwd=ROOT, env=_env(env), capture_output=True,
                          text=True, timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f"{' '.join(_argv(cmd, workdir))} exited {result.returncode}:\n"
                         f"{result.stderr[-4000:]}")
  return result.stdout


def list_checkpoints(directory: str):
  """(complete step numbers, orbax tmp directory names) in a checkpoint directory."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return [], []
  steps = sorted(int(n) for n in names if n.isdigit())
  return steps, sorted(n for n in names if TMP_MARK in n)


def _kill_once(cmd, workdir, stage, rng, max_delay, during_save, env, timeout, poll):
  ckpt = checkpoint_dir(workdir, stage)
  with tempfile.TemporaryFile("w+") as err:   # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen(_argv(cmd, workdir), cwd=ROOT, env=_env(env),
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    deadline = time.time() + timeout
    delay = 0.0
    try:
      while proc.poll() is None:
        if time.time() > deadline:
          raise AssertionError(f"no checkpoint within {timeout} s")
        steps, tmps = list_checkpoints(ckpt)
        if during_save:
          if steps and any(int(re.match(r"\d+", t).group()) > steps[0] for t in tmps):
            break
        elif steps:
          delay = rng.uniform(0.0, max_delay)
          time.sleep(delay)
          break
        time.sleep(poll)
      killed = proc.poll() is None
      if killed:
        os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    if not killed and proc.returncode != 0:
      err.seek(0)
      raise AssertionError(f"the run to be killed failed on its own ({proc.returncode}):\n"
                           f"{err.read()[-4000:]}")
  steps, tmps = list_checkpoints(ckpt)
  return KillReport(killed=killed, complete_steps=steps, tmp_dirs=tmps, delay_s=delay,
                    model_existed=os.path.exists(model_dir(workdir, stage)))


def run_and_kill(cmd: Sequence[str], workdir: str, stage: str, *, seed: int,
                 max_delay: float = 1.0, during_save: bool = False, env: Optional[dict] = None,
                 timeout: float = 600, poll: float = 0.005, attempts: int = 3) -> KillReport:
  """Starts the command and SIGKILLs it.

  during_save=False: once the first complete checkpoint exists, waits a random delay in
  [0, max_delay) (random.Random(seed)) and kills. during_save=True: kills as soon as a temporary
  (unfinished) checkpoint directory of a step after the first complete checkpoint appears; if
  the save finished before the kill landed (no tmp directory left) or the run ended first, the
  workdir is wiped and the run tried again, up to `attempts` times (`report.attempts`).
  """
  rng = random.Random(seed)
  for attempt in range(1, attempts + 1):
    report = _kill_once(cmd, workdir, stage, rng, max_delay, during_save, env, timeout, poll)
    report.attempts = attempt
    if not during_save or (report.killed and report.tmp_dirs):
      break
    shutil.rmtree(workdir)
  return report


def kill_and_resume(cmd: Sequence[str], workdir: str, stage: str, *, seed: int,
                    max_delay: float = 1.0, during_save: bool = False,
                    env: Optional[dict] = None, timeout: float = 600) -> KillReport:
  """run_and_kill, then the same command again to completion in the same workdir."""
  report = run_and_kill(cmd, workdir, stage, seed=seed, max_delay=max_delay,
                        during_save=during_save, env=env, timeout=timeout)
  report.resume_output = run_to_completion(cmd, workdir, env=env, timeout=timeout)
  return report


def load_params(path: str) -> dict:
  """{parameter path: numpy array} of the model at `path` (rlhf_jax.convert.load_model)."""
  import jax  # pylint: disable=g-import-not-at-top
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  params = load_model(path).params
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_params(path_a: str, path_b: str) -> None:
  """The two models have the same parameter names, shapes, dtypes and bits."""
  a, b = load_params(path_a), load_params(path_b)
  assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
  for name in sorted(a):
    x, y = a[name], b[name]
    assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, x.dtype, y.shape, y.dtype)
    if not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
      diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max()
      raise AssertionError(f"{name} differs between {path_a} and {path_b} (max |diff| {diff:.3e})")


def start(cmd: Sequence[str], workdir: str, env: Optional[dict] = None) -> subprocess.Popen:
  """Starts the command in the background (e.g. the reference run while another is killed);
  finish it with `wait(proc)`. Its output goes to temporary files, so it never blocks on a pipe."""
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(_argv(cmd, workdir), cwd=ROOT, env=_env(env), stdout=out, stderr=err,
                          text=True)
  proc.output_files = (out, err)
  return proc


def wait(proc: subprocess.Popen, timeout: float = 600) -> str:
  """Waits for a `start`ed command; returns its stdout; a non-zero exit is an AssertionError."""
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out, err = proc.output_files
  out.seek(0)
  err.seek(0)
  stdout, stderr = out.read(), err.read()
  out.close()
  err.close()
  if proc.returncode != 0:
    raise AssertionError(f"{' '.join(proc.args)} exited {proc.returncode}:\n{stderr[-4000:]}")
  return stdout


def save_random_model(path: str, tokenizer_dir: str, head: str = "lm", seed: int = 0,
                      preset: str = "tiny", **overrides) -> str:
  """A randomly initialised model (e.g. the `init_from` of an SFT/RM/PPO test run) written in
  rlhf_jax format with a tokenizer; model-config overrides as keywords (num_layers=1)."""
  import jax  # pylint: disable=g-import-not-at-top
  from rlhf_jax.convert import save_model  # pylint: disable=g-import-not-at-top
  from rlhf_jax.models import get_model_config, init_params  # pylint: disable=g-import-not-at-top
  cfg = get_model_config(preset, **overrides)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed), head))
  save_model(path, cfg, params, fmt="rlhf_jax", head=head, tokenizer_dir=tokenizer_dir)
  return path


def snapshot(root):
  """{relative path: (size, mtime) for files, None for folders} of everything under root."""
  out = {}
  for dirpath, dirnames, files in os.walk(root):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), root)] = None
    for name in files:
      st = os.stat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", required=True)
  parser.add_argument("--root", required=True, help="folder for the two workdirs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_delay", type=float, default=1.0)
  parser.add_argument("--during_save", action="store_true")
  parser.add_argument("cmd", nargs=argparse.REMAINDER,
                      help="after --: the python arguments, with {workdir}")
  args = parser.parse_args(argv)
  cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
  ref, work = os.path.join(args.root, "reference"), os.path.join(args.root, "killed")
  t0 = time.time()
  run_to_completion(cmd, ref)
  t1 = time.time()
  report = kill_and_resume(cmd, work, args.stage, seed=args.seed, max_delay=args.max_delay,
                           during_save=args.during_save)
  assert_same_params(model_dir(ref, args.stage), model_dir(work, args.stage))
  print(f"identical: reference {t1 - t0:.1f} s, kill+resume {time.time() - t1:.1f} s; "
        f"killed={report.killed} checkpoints after the kill {report.complete_steps} "
        f"tmp {report.tmp_dirs} delay {report.delay_s:.3f} s")


if __name__ == "__main__":
  main()
