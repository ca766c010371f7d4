r"""On each worker of a Cloud TPU VM slice: run a command as process <worker> of the slice's JAX job.

  python3 launch/tpu_worker.py [--port=8476] [--dry-run] -- python3 -m rlhf_jax.main --config=...

Reads, like JAX's own Cloud TPU detection, two keys of the TPU VM metadata server
(http://$GCE_METADATA_IP, default metadata.google.internal, /computeMetadata/v1/instance/attributes/):
  agent-worker-number        this worker's index I
  worker-network-endpoints   the slice's workers, comma-separated `x:y:ADDRESS`, worker 0 first
and appends rlhf_jax.distributed's flags to the command:
  --coordinator_address=<address of worker 0>:PORT --num_processes=<workers> --process_id=I
then replaces itself with the command (exec). A slice of one host gets no flags; flags the
command already has are left alone. launch/tpu_vm.py runs this on every worker with --worker=all.
"""
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_util as lu  # noqa: E402  pylint: disable=g-import-not-at-top

DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def metadata(key: str, timeout: float = 10.0) -> str:
  """One attribute of this VM from the GCE metadata server."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  url = f"http://{host}/computeMetadata/v1/instance/attributes/{key}"
  req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.read().decode().strip()
  except (urllib.error.URLError, OSError) as e:
    raise lu.LaunchError(f"metadata key {key}: cannot read {url} ({e}); is this a Cloud TPU VM?") \
        from None


def parse_endpoints(text: str) -> list:
  """Worker addresses from `worker-network-endpoints` ('x:y:10.0.0.2,x:y:10.0.0.3' -> IPs)."""
  out = []
  for entry in text.split(","):
    entry = entry.strip()
    if not entry:
      continue
    parts = entry.split(":")
    out.append(parts[2] if len(parts) >= 3 else entry)
  if not out:
    raise lu.LaunchError(f"metadata key worker-network-endpoints: no workers in {text!r}")
  return out


def distributed_flags(worker: int, endpoints: list, port: int) -> list:
  """rlhf_jax.distributed's flags for worker `worker` of the slice (none for one host)."""
  if not 0 <= worker < len(endpoints):
    raise lu.LaunchError(f"metadata key agent-worker-number: {worker} is not in "
                         f"[0, {len(endpoints)}) workers")
  if len(endpoints) == 1:
    return []
  return [f"--coordinator_address={endpoints[0]}:{port}", f"--num_processes={len(endpoints)}",
          f"--process_id={worker}"]


def has_distributed_flags(command: list) -> bool:
  return any(a.split("=", 1)[0] in DISTRIBUTED_FLAGS for a in command)


def main(argv):
  p = lu.Parser(prog="launch/tpu_worker.py",
                description="Run a command as this TPU VM worker's process of the JAX job.")
  p.add_argument("--port", type=int, default=8476, help="Coordinator port on worker 0.")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print the command instead of running it.")
  own, command = lu.split_passthrough(argv)
  args = p.parse_args(own)
  if not command:
    p.error("no command: give it after '--' (e.g. -- python3 -m rlhf_jax.main --config=...)")
  if not 0 < args.port < 65536:
    p.error(f"--port: expected 1..65535, got {args.port}")
  if not has_distributed_flags(command):
    raw = metadata("agent-worker-number")
    try:
      worker = int(raw)
    except ValueError:
      raise lu.LaunchError(f"metadata key agent-worker-number: expected an integer, got {raw!r}") \
          from None
    command = command + distributed_flags(worker, parse_endpoints(
        metadata("worker-network-endpoints")), args.port)
  print(lu.shell_line(command), flush=True)
  if args.dry_run:
    return 0
  try:
    os.execvp(command[0], command)
  except OSError as e:
    raise lu.LaunchError(f"cannot run {command[0]}: {e.strerror}") from None


if __name__ == "__main__":
  sys.exit(lu.main_wrapper(main))
