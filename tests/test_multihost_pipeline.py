"""Multi-host for real (issue 15): the whole pipeline (data -> pretrain -> SFT -> collect -> RM ->
PPO -> PPO-ptx -> DPO -> eval) as 2 processes x 4 CPU devices (jax.distributed, gloo) is the pipeline as
1 process x 8 devices, bit for bit, on the same mesh (1, 8, 1); and it survives SIGKILLs.

Three runs of `python -m rlhf_jax.main --config=configs/ppo_ptx.py` with the same tiny overrides
(ARGS), each in its own workdir (its own offline data), started together (while one process
waits at a collective for the other's compile, the machine's other core runs another run):

  two     2 processes x 4 devices (--coordinator_address/--num_processes/--process_id).
  one     1 process x 8 devices whose cross-device sums go through gloo as well
          (tests/one_process_gloo.py). With XLA's in-process all-reduce instead, the 8 partial
          sums of a gradient are added in another order than gloo's, and the weights differ from
          the 2-process run's by a few float32 ulps, growing along the pipeline (measured: pretrain
          7e-9, SFT 1.2e-7, RM 9.5e-7, PPO 2.7e-7, PPO-ptx 9.2e-7 max abs; results.json within
          1e-6 relative; the sampled tokens, the collected comparisons and the win rates
          identical). With the same collectives every stage is bit-identical.
  killed  2 processes, both SIGKILLed during SFT after its first checkpoint, the same two commands
          run again and SIGKILLed during PPO-ptx after its first checkpoint, then run again to the
          end: every stage's final model, metrics and results equal the `two` run's.

`--config.data.shards=2` in all three: the records are cut into 2 data shards, each read by its
own loader (own shuffle, packing, position); each of the two processes reads one, the single
process both (the default, one shard per process, would give it one shard and other batches).
The two processes' packed SFT loaders stand at different positions in every checkpoint (one file
per process); a resumed run that gave a process another's position would train on other rows.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import kill_resume as kr
from fake_devices import xla_flags

ROOT = kr.ROOT
ONE_PROCESS = os.path.join(ROOT, "tests", "one_process_gloo.py")
STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo")
TIMING = ("steps_per_s", "iters_per_s", "eval_seconds")

# The pipeline, tiny: a 1-layer model, the offline task at a few hundred records, a few steps per
# stage (SFT long enough that its samples differ in gold score: collect drops all-tie prompts),
# checkpoints within SFT and PPO-ptx to resume from. No oracle run here (it takes a PPO stage more
# in each of the three runs; tests/test_multihost_oracle.py runs it on 2 processes against 1).
ARGS = [
    "--config=configs/ppo_ptx.py", "--config.data.shards=2", "--config.oracle_run=False",
    "--config.model.num_layers=1", "--config.rm.model.num_layers=1",
    "--config.data.task.ptx=256", "--config.data.task.sft=256",
    "--config.data.task.comparisons=64", "--config.data.task.prompts=128",
    "--config.data.task.validation=32", "--config.data.task.probe=8",
    "--config.pretrain.num_steps=4", "--config.pretrain.checkpoint_every=2",
    "--config.pretrain.eval_every=2", "--config.pretrain.log_every=2",
    "--config.pretrain.eval_batches=1", "--config.pretrain.batch_size=8",
    "--config.pretrain.eval_batch_size=8",
    "--config.sft.num_steps=16", "--config.sft.checkpoint_every=4",
    "--config.sft.eval_every=8", "--config.sft.log_every=4", "--config.sft.eval_batches=1",
    "--config.sft.batch_size=8", "--config.sft.eval_batch_size=8",
    "--config.sft.optimizer.lr=0.003", "--config.sft.optimizer.warmup_steps=0",
    "--config.collect.num_train_prompts=16", "--config.collect.num_eval_prompts=16",
    "--config.collect.batch_size=8", "--config.collect.min_k=6", "--config.collect.max_k=6",
    "--config.collect.max_new_tokens=8",
    "--config.rm.num_steps=4", "--config.rm.checkpoint_every=2", "--config.rm.eval_every=2",
    "--config.rm.log_every=2", "--config.rm.eval_batches=1", "--config.rm.batch_size=8",
    "--config.rm.eval_batch_size=8", "--config.rm.norm_examples=8",
    "--config.ppo.num_iterations=3", "--config.ppo.batch_size=8", "--config.ppo.minibatches=1",
    "--config.ppo.checkpoint_every=1", "--config.ppo.log_every=1",
    "--config.ppo.response_len=8", "--config.ppo.ptx_seq_len=32",
    "--config.eval.num_prompts=8", "--config.eval.samples_per_prompt=1",
    "--config.eval.batch_size=8", "--config.eval.max_new_tokens=8",
    "--config.eval.pretrain_batches=1", "--config.eval.pretrain_batch_size=8",
    "--config.eval.pretrain_seq_len=32", "--config.eval.best_of=(2,)",
    "--config.eval.probe_prompts=8", "--config.eval.probe_new_tokens=2",
    "--config.eval.num_examples=1",
    "--config.dpo.num_steps=4", "--config.dpo.checkpoint_every=2", "--config.dpo.eval_every=2",
    "--config.dpo.log_every=2", "--config.dpo.eval_batches=1", "--config.dpo.batch_size=8",
    "--config.dpo.eval_batch_size=8",
]
# LLVM at -O0: the tiny programs compile in less time than they would save running (each process
# of a multi-process run compiles for itself: JAX's persistent cache serves process 0 only).
XLA = "--xla_backend_optimization_level=0"
TIMEOUT = 900


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Run:
  """One run of the pipeline command in `workdir`: `num_processes` processes (1 = the gloo
  wrapper), each started again by `start`; output in <workdir>.<start>.<process>.log."""

  def __init__(self, workdir, num_processes):
    self.workdir, self.n, self.starts, self.procs = workdir, num_processes, 0, []

  def start(self):
    port, self.starts = _free_port(), self.starts + 1
    env = dict(os.environ, XLA_FLAGS=xla_flags(8 // self.n, XLA), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    if self.n > 1:   # JAX's persistent cache serves process 0 only: a process 0 that loads a step
      # from it waits at the step's first collective while process 1 compiles, and gloo gives up
      # after 30 s (seen on a loaded 2-core machine, in the killed run's resumed PPO-ptx).
      env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    self.procs = []
    for i in range(self.n):
      if self.n == 1:
        cmd = [sys.executable, ONE_PROCESS, f"--port={port}"]
      else:
        cmd = [sys.executable, "-m", "rlhf_jax.main", f"--coordinator_address=localhost:{port}",
               f"--num_processes={self.n}", f"--process_id={i}"]
      with open(self._log(i), "w") as log:   # a file, not a pipe: a full pipe would block
        self.procs.append(subprocess.Popen(cmd + ARGS + [f"--workdir={self.workdir}"], cwd=ROOT,
                                           env=env, stdout=log, stderr=subprocess.STDOUT))
    return self

  def _log(self, i, start=None):
    return f"{self.workdir}.{start or self.starts}.{i}.log"

  def output(self, i=0, start=None):
    """What process i printed in the latest start (or start number `start`, from 1)."""
    with open(self._log(i, start)) as f:
      return f.read()

  def poll(self):
    """None while all run; True when all ended well; raises when one failed (killing the
    others, which would wait for it at a barrier)."""
    codes = [p.poll() for p in self.procs]
    if any(c not in (None, 0) for c in codes):
      self.kill()
      bad = next(i for i, c in enumerate(codes) if c not in (None, 0))
      raise AssertionError(f"{self.workdir}: process {bad} exited {codes[bad]}:\n"
                           f"{self.output(bad)[-4000:]}")
    return True if all(c == 0 for c in codes) else None

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self.procs:
      p.wait()


class Killer:
  """Drives the `killed` run: start; once `<stage>/checkpoints` holds a complete checkpoint,
  wait a random delay and SIGKILL every process; start again; the next stage; finally run on."""

  def __init__(self, run, stages, seed=0):
    self.run, self.plan, self.rng = run, list(stages), random.Random(seed)
    self.reports = []
    run.start()

  def poll(self):
    if self.plan:
      stage = self.plan[0]
      if self.run.poll():
        raise AssertionError(f"{self.run.workdir}: the run ended before {stage} was killed")
      steps, _ = kr.list_checkpoints(kr.checkpoint_dir(self.run.workdir, stage))
      if steps:
        time.sleep(self.rng.uniform(0.0, 0.5))
        self.run.kill()
        self.reports.append({
            "stage": stage, "checkpoints": kr.list_checkpoints(
                kr.checkpoint_dir(self.run.workdir, stage))[0],
            "model_existed": os.path.exists(kr.model_dir(self.run.workdir, stage))})
        self.plan.pop(0)
        self.run.start()
      return None
    return self.run.poll()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_pipeline")
  two, one = Run(str(root / "two"), 2), Run(str(root / "one"), 1)
  killed = Run(str(root / "killed"), 2)
  started = time.monotonic()
  two.start()
  one.start()
  killer = Killer(killed, ("sft", "ppo_ptx"))
  pending = [two.poll, one.poll, killer.poll]
  try:
    while pending:
      if time.monotonic() - started > TIMEOUT:
        raise AssertionError(f"the runs took more than {TIMEOUT} s")
      pending = [p for p in pending if not p()]
      time.sleep(0.02)
  finally:
    for r in (two, one, killed):
      r.kill()
  print(f"three pipeline runs in {time.monotonic() - started:.0f} s")
  return {"two": two, "one": one, "killed": killed, "kills": killer.reports}


# ----------------------------------------------------------------------------- comparisons

def _clean(x, workdir):
  """JSON without timing, machine facts or the workdir's path."""
  if isinstance(x, dict):
    return {k: _clean(v, workdir) for k, v in x.items()
            if k not in TIMING and not k.endswith("seconds") and k != "machine"}
  if isinstance(x, list):
    return [_clean(v, workdir) for v in x]
  return x.replace(workdir, "WORKDIR") if isinstance(x, str) else x


def _json(workdir, *path):
  with open(os.path.join(workdir, *path), encoding="utf-8") as f:
    return _clean(json.load(f), workdir)


def _metrics(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl"), encoding="utf-8") as f:
    return [_clean(json.loads(line), workdir) for line in f]


def _assert_same_pipeline(a, b):
  """Every stage's final params (bit for bit), stage record and metrics; collect's comparisons;
  results.json (timing and machine aside)."""
  for stage in STAGES:
    kr.assert_same_params(kr.model_dir(a, stage), kr.model_dir(b, stage))
    assert _json(a, stage, "model", "rlhf_jax_stage.json") == _json(
        b, stage, "model", "rlhf_jax_stage.json"), stage
    assert _metrics(a, stage) == _metrics(b, stage), stage
  for name in ("comparisons_train.jsonl", "comparisons_validation.jsonl"):
    with open(os.path.join(a, "collect", name)) as fa, open(os.path.join(b, "collect", name)) as fb:
      assert fa.read() == fb.read(), name
  assert _json(a, "results.json") == _json(b, "results.json")


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
  two, one = runs["two"].workdir, runs["one"].workdir
  _assert_same_pipeline(two, one)
  results = json.load(open(os.path.join(two, "results.json")))
  assert results["meta"]["machine"]["process_count"] == 2
  assert json.load(open(os.path.join(one, "results.json")))["meta"]["machine"][
      "process_count"] == 1


@pytest.mark.slow
def test_killed_in_sft_and_in_ppo_ptx_resumes_to_the_same_pipeline(runs):
  kills = runs["kills"]
  assert [k["stage"] for k in kills] == ["sft", "ppo_ptx"]
  for k in kills:     # killed mid-stage: after a checkpoint, before the final model
    assert k["checkpoints"] and not k["model_existed"], k
  killed = runs["killed"]
  assert killed.starts == 3
  for start, stage in ((2, "sft"), (3, "ppo_ptx")):    # each process resumed from a checkpoint
    for i in range(2):
      assert f"{stage}: resumed from " in killed.output(i, start), (start, i)
  _assert_same_pipeline(runs["two"].workdir, killed.workdir)


@pytest.mark.slow
def test_each_process_checkpoints_its_own_data_position(runs):
  """The two processes' packed SFT loaders stand at different positions; each checkpoint holds
  one file per process (the resumed `killed` run restored each its own: its SFT equals)."""
  ckpt = kr.checkpoint_dir(runs["two"].workdir, "sft")
  steps, _ = kr.list_checkpoints(ckpt)
  assert steps
  for step in steps:
    files = sorted(f for f in os.listdir(os.path.join(ckpt, str(step), "data"))
                   if f.startswith("process_"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"], files
    states = [json.load(open(os.path.join(ckpt, str(step), "data", f))) for f in files]
    assert states[0] != states[1], states
  meta = json.load(open(os.path.join(ckpt, str(steps[-1]), "meta", "metadata")))
  assert "data" not in meta["user"]      # not process 0's position for everyone
