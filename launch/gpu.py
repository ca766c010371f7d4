r"""Multi-process GPU launch of rlhf_jax on one or more hosts: one JAX process per GPU (default) or
per group of GPUs, started locally or over ssh.

  python launch/gpu.py --hosts=localhost --gpus_per_host=8 [--config=configs/ppo_ptx.py] -- [args]
  python launch/gpu.py --hosts=node1,node2 --gpus_per_host=8 --processes_per_host=1 \
      --remote_dir=/shared/rlhf_jax -- --workdir=/shared/runs/ppo

With H hosts, G GPUs per host and P processes per host (default P = G), process
i = h * P + j (host h, local j) sees GPUs j*G/P .. (j+1)*G/P - 1 through CUDA_VISIBLE_DEVICES and
gets rlhf_jax.distributed's flags

  --coordinator_address=<hosts[0] or --coordinator_host>:PORT --num_processes=H*P --process_id=i

(no flags for a single process). A host named localhost / 127.0.0.1 runs its processes here, in
this checkout; any other host runs `ssh HOST 'cd REMOTE_DIR && ...'` (the code and its environment
must already be there, with a Python jax supports, 3.11+; --remote_dir defaults to this checkout's
path). With several hosts a `--workdir=DIR` after `--` is required: one directory every host mounts
(NFS, a gcsfuse-mounted bucket; not a gs:// URL), as process 0 prepares the data the others read
and every process writes its own checkpoint shards there; rlhf_jax checks at start-up that all
processes see it. --dry-run prints one command per process and runs nothing. Otherwise all
processes start at once; when one fails the others are stopped and the launcher exits with status
1 and one line; bad flags exit with status 2. Processes on remote hosts stop when the job's
coordinator goes away, not when ssh is killed.
"""
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_util as lu  # noqa: E402  pylint: disable=g-import-not-at-top

LOCAL_HOSTS = ("localhost", "127.0.0.1")


def parse_args(argv):
  p = lu.Parser(prog="launch/gpu.py", description="Multi-process GPU launch of rlhf_jax.")
  p.add_argument("--hosts", default="localhost", help="Comma-separated hosts; the first runs "
                 "process 0 (the coordinator).")
  p.add_argument("--gpus_per_host", type=int, default=None,
                 help="GPUs on each host (default: counted with nvidia-smi, local runs only).")
  p.add_argument("--processes_per_host", type=int, default=None,
                 help="Processes per host (default: one per GPU); must divide --gpus_per_host.")
  p.add_argument("--coordinator_host", default=None,
                 help="Address of hosts[0] as the other hosts reach it (default: hosts[0]).")
  p.add_argument("--port", type=int, default=12355, help="Coordinator port.")
  p.add_argument("--config", default="configs/ppo_ptx.py", help="--config of the program.")
  p.add_argument("--module", default="rlhf_jax.main", help="Python module to run (python -m).")
  p.add_argument("--python", default=None,
                 help="Python on the hosts (default: this interpreter locally, python3 remotely).")
  p.add_argument("--remote_dir", default=lu.ROOT, help="Checkout directory on remote hosts.")
  p.add_argument("--ssh", default="ssh", help="ssh program (e.g. 'ssh -p 2222').")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print the commands, run nothing.")
  own, extra = lu.split_passthrough(argv)
  args = p.parse_args(own)
  args.hosts = [h.strip() for h in args.hosts.split(",")]
  if not args.hosts or any(not h or h.startswith("-") or any(c.isspace() for c in h)
                           for h in args.hosts):
    p.error(f"--hosts: expected comma-separated host names, got {','.join(args.hosts)!r}")
  if len(set(args.hosts)) != len(args.hosts):
    p.error(f"--hosts: a host is listed twice in {','.join(args.hosts)!r}")
  remote = [h for h in args.hosts if h not in LOCAL_HOSTS]
  if args.gpus_per_host is None:
    if remote or args.dry_run:
      p.error("--gpus_per_host: required with remote hosts or --dry-run (GPUs on each host)")
    args.gpus_per_host = count_local_gpus()
  if args.gpus_per_host < 1:
    p.error(f"--gpus_per_host: expected at least 1, got {args.gpus_per_host}")
  if args.processes_per_host is None:
    args.processes_per_host = args.gpus_per_host
  if not 1 <= args.processes_per_host <= args.gpus_per_host or \
      args.gpus_per_host % args.processes_per_host:
    p.error(f"--processes_per_host: must divide --gpus_per_host={args.gpus_per_host}, "
            f"got {args.processes_per_host}")
  if not 0 < args.port < 65536:
    p.error(f"--port: expected 1..65535, got {args.port}")
  if args.hosts[0] in LOCAL_HOSTS and remote and not args.coordinator_host:
    p.error("--coordinator_host: required when hosts[0] is local and other hosts are remote "
            "(the address they reach this machine at)")
  if not args.config or any(c.isspace() for c in args.config):
    p.error(f"--config: expected a path[:preset] without spaces, got {args.config!r}")
  workdir = workdir_arg(extra)
  if workdir is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", workdir):
    p.error(f"--workdir: {workdir} is a URL; give a directory every host mounts (NFS, or the "
            "bucket mounted with gcsfuse)")
  if len(args.hosts) > 1 and args.module == "rlhf_jax.main" and not workdir:
    p.error("--workdir: several hosts need `-- --workdir=DIR`, a directory every host mounts "
            "(NFS, a gcsfuse-mounted bucket): the default runs/<name> would be each host's own")
  args.extra = extra
  return args


def workdir_arg(extra):
  """The --workdir value among the program's arguments (`--workdir=D` or `--workdir D`)."""
  for i, arg in enumerate(extra):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(extra):
      return extra[i + 1]
  return None


def count_local_gpus() -> int:
  try:
    out = subprocess.run(["nvidia-smi", "--list-gpus"], check=True, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
  except (OSError, subprocess.CalledProcessError):
    sys.stderr.write("error: --gpus_per_host: not given and nvidia-smi cannot count the GPUs\n")
    sys.exit(2)
  return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))


def plan(args) -> list:
  """[(process id, host, CUDA_VISIBLE_DEVICES, program argv)] for every process, id order."""
  g, per = args.gpus_per_host, args.processes_per_host
  n = len(args.hosts) * per
  coordinator = f"{args.coordinator_host or args.hosts[0]}:{args.port}"
  out = []
  for h, host in enumerate(args.hosts):
    local = host in LOCAL_HOSTS
    python = args.python or (sys.executable if local else "python3")
    for j in range(per):
      i = h * per + j
      gpus = ",".join(str(d) for d in range(j * g // per, (j + 1) * g // per))
      argv = [python, "-m", args.module, f"--config={args.config}"] + args.extra
      if n > 1:
        argv += [f"--coordinator_address={coordinator}", f"--num_processes={n}",
                 f"--process_id={i}"]
      out.append((i, host, gpus, argv))
  return out


def command_for(args, host, gpus, argv):
  """(argv to start, extra environment) for one process."""
  env = {"CUDA_VISIBLE_DEVICES": gpus}
  if host in LOCAL_HOSTS:
    return argv, env
  remote = f"cd {shlex.quote(args.remote_dir)} && {lu.shell_line(argv, env)}"
  return shlex.split(args.ssh) + ["-o", "BatchMode=yes", host, remote], {}


def _stop(procs):
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + 10
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv):
  args = parse_args(argv)
  jobs = [(i, host) + command_for(args, host, gpus, prog) for i, host, gpus, prog in plan(args)]
  print(f"# {len(jobs)} processes; local ones run in {lu.ROOT}", flush=True)
  for _, _, cmd, env in jobs:
    print(lu.shell_line(cmd, env), flush=True)
  if args.dry_run:
    return 0
  procs = []
  try:
    for _, _, cmd, env in jobs:
      try:
        procs.append(subprocess.Popen(cmd, cwd=lu.ROOT, env={**os.environ, **env}))
      except OSError as e:
        raise lu.LaunchError(f"cannot start `{lu.shell_line(cmd)[:120]}`: {e.strerror}") from None
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        raise lu.LaunchError(f"process {i} (host {jobs[i][1]}) exited with status {code}; "
                             "stopped the others")
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.2)
  finally:
    _stop(procs)


if __name__ == "__main__":
  sys.exit(lu.main_wrapper(main))
