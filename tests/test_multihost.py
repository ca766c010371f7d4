"""Multi-host for real: 2 processes x 4 CPU devices (gloo collectives over localhost) train the same
steps as 1 process x 8 devices, each process reading only its own rows of every batch."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import multihost_worker as w
from fake_devices import xla_flags
from rlhf_jax import distributed, sharding
from rlhf_jax.errors import UserError

STEPS = 3
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(num_processes: int, out: str, *extra) -> list:
  """Starts the workers (one per fake host)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  procs = []
  for i in range(num_processes):
    with open(f"{out}.{i}.log", "w") as log:      # a file, not a pipe: a full pipe would block
      procs.append(subprocess.Popen([sys.executable, WORKER, f"--process_id={i}",
                                     f"--num_processes={num_processes}", f"--port={port}",
                                     f"--steps={STEPS}", f"--out={out}", *extra],
                                    env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _finish(procs: list, out: str, timeout: float) -> list:
  """Waits for the workers; kills all of them if any fails or they outlive `timeout` seconds."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  for i, p in enumerate(procs):
    with open(f"{out}.{i}.log") as log:
      assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log.read()[-3000:]}"
  results = []
  for i in range(len(procs)):
    with open(f"{out}.{i}") as f:
      results.append(json.load(f))
  return results


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  out = str(tmp_path / "result")
  start = time.monotonic()
  procs = _start(2, out)
  try:        # the 1-process reference runs while the workers start up
    state, losses = w.run(sharding.make_mesh((1, 8, 1)), STEPS)
    checksum = w.param_checksum(state["params"])
  finally:   # (a hang guard: 100 s killed healthy workers on 2 cores shared at load 15, cold cache)
    results = _finish(procs, out, timeout=300.0 - (time.monotonic() - start))
  for pid, r in enumerate(results):
    assert r["process_count"] == 2 and r["device_count"] == 8
    # Each host read only its half of the global batch.
    assert r["rows"] == [pid * w.BATCH_SIZE // 2, (pid + 1) * w.BATCH_SIZE // 2]
    np.testing.assert_allclose(r["losses"], losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r["checksum"], checksum, rtol=1e-5, atol=1e-5)
  assert results[0]["losses"] == results[1]["losses"]


@pytest.mark.slow
def test_each_process_restores_its_own_data_position(tmp_path):
  """Packed SFT rows of each host's own data shard: the two loaders stand at different positions
  after the same number of batches; a checkpoint holds one position per process and each process
  restores its own (the next batches are the ones it would have read), not process 0's."""
  out = str(tmp_path / "result")
  start = time.monotonic()
  procs = _start(2, out, "--mode=data", f"--ckpt={tmp_path / 'ckpt'}")
  try:        # one process reading both data shards holds both positions
    one = w.packed_sft_batches(8, num_shards=2)
    for _ in range(3):
      next(one)
    both = one.get_state()["shards"]
  finally:
    results = _finish(procs, out, timeout=100.0 - (time.monotonic() - start))
  assert results[0]["state"] != results[1]["state"]       # the packers are at different records
  for pid, r in enumerate(results):
    assert r["restored"] == r["state"] == both[pid]
    assert r["same_next"]
    assert r["meta"] == {"same": "on every process"}
  files = sorted(os.listdir(tmp_path / "ckpt" / "3" / "data"))
  assert [f for f in files if f.startswith("process_")] == ["process_0-of-2.json",
                                                           "process_1-of-2.json"]


def test_settings_from_flags_and_environment():
  assert distributed.resolve_settings(env={}) is None
  assert distributed.resolve_settings(num_processes=1, env={}) is None
  assert distributed.resolve_settings("h:1234", 2, 1, env={}) == {
      "coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve_settings(env=env)["process_id"] == 3
  assert distributed.resolve_settings(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
  assert distributed.resolve_settings(env={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  for kwargs, field in [(dict(num_processes=2, process_id=0), "--coordinator_address"),
                        (dict(coordinator_address="nohostport", num_processes=2, process_id=0),
                         "--coordinator_address"),
                        (dict(coordinator_address="h:1", num_processes=2, process_id=2),
                         "--process_id"),
                        (dict(coordinator_address="h:1", num_processes=2), "--num_processes")]:
    with pytest.raises(UserError, match=field):
      distributed.resolve_settings(env={}, **kwargs)
  if distributed.detect_cluster() is None and "JAX_COORDINATOR_ADDRESS" not in os.environ:
    assert distributed.initialize_from_env() is False    # single process: a no-op
