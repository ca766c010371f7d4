"""XLA flags for tests (and the processes they start) that run on N fake CPU devices.

On fake CPU devices a collective waits, in one rendezvous, for the threads of all N devices; XLA
aborts the whole process (SIGABRT, exit 134, no Python traceback) when one of them has not arrived
within `xla_cpu_collective_call_warn_stuck_timeout_seconds` + `..._terminate_timeout_seconds`
(20 + 40 s by default). A device can be that
late with nothing wrong: it is still running a program dispatched before (JAX dispatches
asynchronously), or a loaded 2-core machine runs its thread late. CI died this way in
tests/test_micro_batches.py. The tests give it 2 minutes more; a real deadlock (XLA:CPU has one:
tests/test_micro_batches.py `_iterate`) still ends in an abort soon.
"""

COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=120"


def xla_flags(num_devices: int, *extra: str) -> str:
  """XLA_FLAGS for `num_devices` fake CPU devices with the long collective timeout, then `extra`."""
  return " ".join([f"--xla_force_host_platform_device_count={num_devices}", COLLECTIVE_TIMEOUT,
                   *extra])
