"""The collective timeout the tests give fake CPU devices (tests/fake_devices.py): XLA aborts the
process when one device reaches a collective too late, and a device busy with work dispatched
before is late with nothing wrong."""
import os
import subprocess
import sys

import pytest

from fake_devices import xla_flags

LATE = """
import time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

busy = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ x * 1e-3), x))
x = jnp.ones((256, 256))
busy(x, 1).block_until_ready()                            # compiled
start = time.perf_counter()
busy(x, 50).block_until_ready()
n = int(50 * 8 / (time.perf_counter() - start))          # ~8 s of work
mesh = Mesh(np.array(jax.devices()), ("d",))
total = jax.jit(lambda y: jnp.sum(y, axis=0), out_shardings=NamedSharding(mesh, P()))
y = jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh, P("d")))
total(y).block_until_ready()
busy(x, n)                   # dispatched, not awaited: device 0 is busy for ~8 s
print("sum", np.asarray(total(y)).tolist(), flush=True)     # an all-reduce that waits for it
"""


def _run(flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  return subprocess.run([sys.executable, "-c", LATE], capture_output=True, text=True, env=env,
                        timeout=300)


@pytest.mark.slow
def test_a_device_late_for_a_collective_aborts_xla_unless_the_timeout_is_long():
  """XLA waits `warn_stuck` then `terminate` seconds (3 s here) for the device busy ~8 s, then
  aborts (SIGABRT: exit 134 in a shell, as CI did); with the tests' flags the same program
  finishes with the right sum."""
  short = _run("--xla_force_host_platform_device_count=8 "
               "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
               "--xla_cpu_collective_call_terminate_timeout_seconds=2")
  assert short.returncode == -6, (short.returncode, short.stderr[-2000:])
  assert "Termination timeout" in short.stderr
  ok = _run(xla_flags(8, "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1"))
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "sum [8.0, 8.0]" in ok.stdout
