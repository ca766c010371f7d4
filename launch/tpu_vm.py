r"""Run an rlhf_jax stage on a Cloud TPU VM slice (one or many hosts) with gcloud.

  python launch/tpu_vm.py --name=rlhf --zone=us-central2-b --accelerator_type=v4-32 \
      [--project=P] [--runtime_version=tpu-ubuntu2204-base] [--spot] \
      [--config=configs/ppo_ptx.py] [--git_url=URL [--git_ref=REF]] \
      [--steps=create,copy,install,run] [--detach] [--dry-run] -- [args for rlhf_jax.main]

Steps (all by default, in this order; --steps picks some):
  create   `tpu-vm describe`; if the TPU does not exist, `tpu-vm create` (reused when READY).
  copy     this checkout as a tarball (no .git, runs/, caches) scp'd to every worker and unpacked
           into ~/rlhf_jax; or, with --git_url, cloned (then checked out at --git_ref) there.
  install  `pip install -e . jax[tpu]` on every worker.
  run      on every worker at once (`--worker=all`): `launch/tpu_worker.py -- python3 -m
           rlhf_jax.main --config=...`. tpu_worker.py reads the worker's number and the slice's
           worker addresses from the TPU VM metadata and adds --coordinator_address (worker 0),
           --num_processes and --process_id (rlhf_jax.distributed's flags), so every host joins
           the same JAX job. --detach runs it under nohup (log: ~/rlhf_jax/run.log).

--dry-run prints every command and runs nothing. Otherwise the commands run in order and the first
failure stops the launch with one line on stderr (exit status 1); bad flags exit with status 2.
On a slice of several hosts, give a --workdir every host can write (a shared disk or gs://...) in
the args after `--`, as orbax checkpoints of a multi-host run are written by every host.
"""
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_util as lu  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = ("create", "copy", "install", "run")
REMOTE_DIR = "rlhf_jax"            # relative to the worker's home directory
TARBALL = "rlhf_jax_code.tgz"
EXCLUDES = (".git", "runs", "__pycache__", "*.egg-info", ".venv", "venv", ".pytest_cache",
            ".jax_cache", "build", "dist")


def parse_args(argv):
  p = lu.Parser(prog="launch/tpu_vm.py",
                description="Create or reuse a Cloud TPU VM and run rlhf_jax on all its workers.")
  p.add_argument("--name", required=True, help="TPU name.")
  p.add_argument("--zone", required=True, help="Zone, e.g. us-central2-b.")
  p.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16.")
  p.add_argument("--runtime_version", default="tpu-ubuntu2204-base",
                 help="TPU VM image (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, "
                      "v6e: v2-alpha-tpuv6e).")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's).")
  p.add_argument("--spot", action="store_true", help="Create a Spot TPU.")
  p.add_argument("--config", default="configs/ppo_ptx.py",
                 help="--config of rlhf_jax.main (path in the repo[:preset]).")
  p.add_argument("--git_url", default=None, help="Clone this repository on the workers instead "
                 "of copying the local checkout.")
  p.add_argument("--git_ref", default="origin/HEAD", help="Commit/branch to check out (--git_url).")
  p.add_argument("--steps", default=",".join(STEPS), help="Comma-separated subset of "
                 f"{','.join(STEPS)}.")
  p.add_argument("--port", type=int, default=8476, help="JAX coordinator port on worker 0.")
  p.add_argument("--detach", action="store_true", help="Run under nohup; log in ~/rlhf_jax/run.log.")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print every command, run nothing.")
  own, extra = lu.split_passthrough(argv)
  args = p.parse_args(own)
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  if not steps or any(s not in STEPS for s in steps):
    p.error(f"--steps: expected a comma-separated subset of {','.join(STEPS)}, got {args.steps!r}")
  args.steps = [s for s in STEPS if s in steps]
  for field in ("name", "zone", "accelerator_type", "runtime_version", "config"):
    value = getattr(args, field)
    if not value or value.startswith("-") or any(c.isspace() for c in value):
      p.error(f"--{field}: expected a non-empty value without spaces, got {value!r}")
  if not 0 < args.port < 65536:
    p.error(f"--port: expected 1..65535, got {args.port}")
  args.extra = extra
  return args


def _gcloud(args, verb, *rest):
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd + list(rest)


def ssh_all(args, command):
  """`gcloud ... ssh NAME --worker=all --command=COMMAND`: the same command on every worker."""
  return _gcloud(args, "ssh", "--worker=all", f"--command={command}")


def describe_command(args):
  return _gcloud(args, "describe", "--format=value(state)")


def create_command(args):
  cmd = _gcloud(args, "create", f"--accelerator-type={args.accelerator_type}",
                f"--version={args.runtime_version}")
  return cmd + (["--spot"] if args.spot else [])


def tar_command(tarball, root=lu.ROOT):
  return (["tar", "-czf", tarball] + [f"--exclude={e}" for e in EXCLUDES] + ["-C", root, "."])


def copy_commands(args, tarball):
  """Commands that put the code in ~/rlhf_jax on every worker."""
  if args.git_url:
    url, ref, d = shlex.quote(args.git_url), shlex.quote(args.git_ref), REMOTE_DIR
    return [ssh_all(args, f"(test -d {d}/.git || git clone {url} {d}) && git -C {d} fetch "
                          f"--quiet origin && git -C {d} checkout --quiet --detach {ref}")]
  return [tar_command(tarball),
          _gcloud(args, "scp", tarball, f"{args.name}:{TARBALL}", "--worker=all"),
          ssh_all(args, f"mkdir -p {REMOTE_DIR} && tar -xzf {TARBALL} -C {REMOTE_DIR} && "
                        f"rm {TARBALL}")]


def install_command(args):
  return ssh_all(args, f"cd {REMOTE_DIR} && python3 -m pip install --quiet --upgrade pip && "
                       "python3 -m pip install --quiet -e . 'jax[tpu]'")


def run_command(args):
  """The training command, run on every worker; tpu_worker.py adds the multi-host flags."""
  program = ["python3", "launch/tpu_worker.py", f"--port={args.port}", "--",
             "python3", "-m", "rlhf_jax.main", f"--config={args.config}"] + args.extra
  line = lu.shell_line(program)
  if args.detach:
    line = f"nohup {line} > run.log 2>&1 < /dev/null &"
  return ssh_all(args, f"cd {REMOTE_DIR} && {line}")


def create_or_reuse(args):
  done = lu.run(describe_command(args), "describe", args.dry_run, check=False, capture=True)
  if args.dry_run:
    print("# only if the describe above fails (no such TPU):")
    lu.run(create_command(args), "create", True)
    return
  state = (done.stdout or "").strip()
  if done.returncode == 0:
    if state != "READY":
      raise lu.LaunchError(f"TPU {args.name} exists in state {state or 'unknown'}, not READY "
                           "(start or delete it, or choose another --name)")
    print(f"# reusing TPU {args.name} (READY)", flush=True)
    return
  lu.run(create_command(args), "create", False)


def main(argv):
  args = parse_args(argv)
  if "create" in args.steps:
    create_or_reuse(args)
  if "copy" in args.steps:
    tmp = tempfile.mkdtemp(prefix="rlhf_jax_launch_")
    tarball = os.path.join(tmp, TARBALL)
    try:
      for cmd in copy_commands(args, tarball):
        lu.run(cmd, "copy", args.dry_run)
    finally:
      if os.path.exists(tarball):
        os.remove(tarball)
      os.rmdir(tmp)
  if "install" in args.steps:
    lu.run(install_command(args), "install", args.dry_run)
  if "run" in args.steps:
    lu.run(run_command(args), "run", args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(lu.main_wrapper(main))
