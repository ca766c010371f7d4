"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize_from_flags()` (or `initialize_from_env(...)`) at the top of a program, before any
other JAX call. Where the settings come from, first match wins:

  1. flags / arguments  --coordinator_address=host:port --num_processes=N --process_id=I
  2. environment        JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  3. auto-detected      SLURM (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1), Cloud TPU VM
                        slices of several hosts (TPU_WORKER_HOSTNAMES lists more than one host,
                        or MEGASCALE_COORDINATOR_ADDRESS is set): `jax.distributed.initialize()`
                        reads the cluster itself.
  4. otherwise          a single process: nothing to do.

On CPU the cross-process collectives are gloo (TCP). After start-up every process sees all devices in
`jax.devices()`; `rlhf_jax.sharding.make_mesh` spans them, and each host reads only the batch rows
`rlhf_jax.sharding.process_batch_rows` gives it.
"""
import os
from typing import Mapping, Optional, Sequence

from absl import flags

from rlhf_jax.errors import UserError

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs "
    "(else JAX_COORDINATOR_ADDRESS, SLURM, Open MPI or Cloud TPU auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process, 0..num_processes-1.")


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}: expected an integer, got {value!r}") from None


def detect_cluster(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """'slurm', 'mpi' or 'tpu' when the environment is a multi-process job JAX can read; else None."""
  env = os.environ if env is None else env
  if "SLURM_JOB_ID" in env and (_env_int(env, "SLURM_NTASKS") or 1) > 1:
    return "slurm"
  if (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "mpi"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def resolve_settings(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

  Raises UserError for an incomplete or inconsistent explicit setting.
  """
  env = os.environ if env is None else env
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID")
  if address is None and n is None and pid is None:
    return {} if detect_cluster(env) else None
  if n is not None and n < 1:
    raise UserError(f"--num_processes: must be at least 1, got {n}")
  if n == 1 and address is None:
    return None
  if address is None:
    raise UserError("--coordinator_address: required (host:port of process 0) when "
                    "--num_processes/--process_id are given and no cluster is auto-detected")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address: expected host:port, got {address!r}")
  if n is not None and pid is not None and not 0 <= pid < n:
    raise UserError(f"--process_id: must be in [0, {n}), got {pid}")
  if (n is None or pid is None) and not detect_cluster(env):
    raise UserError("--num_processes and --process_id: both are required with a coordinator "
                    "address (they are read from the cluster only on SLURM/Open MPI/Cloud TPU)")
  if n == 1:
    return None
  return {"coordinator_address": address, "num_processes": n, "process_id": pid}


def initialize_from_env(coordinator_address: Optional[str] = None,
                        num_processes: Optional[int] = None, process_id: Optional[int] = None,
                        local_device_ids: Optional[Sequence[int]] = None,
                        initialization_timeout: int = 300) -> bool:
  """Starts JAX's multi-process runtime if this is a multi-process job; True if it did (or had).

  Must run before anything touches a JAX backend. A no-op for a single process.
  """
  import jax
  if jax.distributed.is_initialized():
    return True
  settings = resolve_settings(coordinator_address, num_processes, process_id)
  if settings is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if local_device_ids is not None:
    settings["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(initialization_timeout=initialization_timeout, **settings)
  return True


def initialize_from_flags() -> bool:
  """`initialize_from_env` with --coordinator_address/--num_processes/--process_id (once parsed)."""
  if not flags.FLAGS.is_parsed():
    return initialize_from_env()
  return initialize_from_env(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


# ----------------------------------------------------------------------------- after start-up
#
# What the processes of a multi-host run agree on: one writer per file, barriers where one
# process's file is another's input, host rows gathered from every process. On a single process
# each is a no-op (or the identity), so single-process runs do exactly what they always did.

def is_primary() -> bool:
  """Whether this process writes the run's files (markers, metrics, reports, JSON): process 0."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (`name` must be the same on all of them)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def gather_rows(local):
  """This process's rows (numpy, the same shape on every process) -> the rows of all processes
  concatenated in process order (the global batch order of `sharding.process_batch_rows`).

  Exact for any dtype: 8-byte values travel as pairs of 32-bit words (JAX runs without x64).
  One process: `local` itself.
  """
  import jax
  import numpy as np
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  if local.dtype.itemsize == 8:
    words = np.ascontiguousarray(local).view(np.uint32).reshape(local.shape[:1] + (-1,))
    out = np.asarray(multihost_utils.process_allgather(words, tiled=True))
    return out.view(local.dtype).reshape((-1,) + local.shape[1:])
  if local.dtype == np.bool_:
    return gather_rows(local.astype(np.int32)).astype(np.bool_)
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def agree_max(value: int) -> int:
  """The largest of every process's `value` (e.g. how many evaluation batches all must run)."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return int(value)
  return int(gather_rows(np.asarray([int(value)], np.int32)).max())
