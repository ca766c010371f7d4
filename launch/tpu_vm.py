r"""Run an rlhf_jax stage on a Cloud TPU VM slice (one or many hosts) with gcloud.

  python launch/tpu_vm.py --name=rlhf --zone=us-central2-b --accelerator_type=v4-32 \
      [--project=P] [--runtime_version=tpu-ubuntu2204-base] [--spot] [--python_version=3.11] \
      [--config=configs/ppo_ptx.py] [--git_url=URL [--git_ref=REF]] [--gcs_mount=/mnt/gcs] \
      [--steps=create,copy,install,mount,run] [--detach] [--dry-run] \
      -- [--workdir=gs://BUCKET/PATH] [other args for rlhf_jax.main]

Steps (all by default, in this order; --steps picks some):
  create   `tpu-vm describe`; if the TPU does not exist, `tpu-vm create` (reused when READY).
  copy     this checkout as a tarball (no .git, runs/, caches) scp'd to every worker and unpacked
           into ~/rlhf_jax; or, with --git_url, cloned (then checked out at --git_ref) there.
  install  on every worker, a virtual environment ~/rlhf_jax/.venv with Python --python_version
           made by uv (pip-installed for the user; uv fetches that Python: the TPU VM images'
           python3 is 3.10 on Ubuntu 22.04, too old for jax), and `uv pip install -e . jax[tpu]`
           into it (jax with libtpu).
  mount    only with a `--workdir=gs://BUCKET/PATH` after `--`: on every worker gcsfuse (installed
           from Google's apt repository if missing) mounts BUCKET at --gcs_mount/BUCKET, and the
           run gets --workdir=<--gcs_mount>/BUCKET/PATH: one directory every host reads and writes
           (rlhf_jax itself works on local paths and refuses gs:// URLs).
  run      on every worker at once (`--worker=all`): `.venv/bin/python launch/tpu_worker.py --
           .venv/bin/python -m rlhf_jax.main --config=...`. tpu_worker.py reads the worker's number
           and the slice's worker addresses from the TPU VM metadata and adds
           --coordinator_address (worker 0), --num_processes and --process_id
           (rlhf_jax.distributed's flags), so every host joins the same JAX job. --detach runs it
           under nohup (log: ~/rlhf_jax/run.log).

--dry-run prints every command and runs nothing. Otherwise the commands run in order and the first
failure stops the launch with one line on stderr (exit status 1); bad flags exit with status 2.
On a slice of several hosts the workdir must be one directory every host sees (process 0 prepares
the data, every host writes its own checkpoint shards): a gs:// --workdir (mounted as above) or a
shared disk; rlhf_jax checks this at start-up and stops in one line on every host if it is not.
"""
import os
import posixpath
import re
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_util as lu  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = ("create", "copy", "install", "mount", "run")
REMOTE_DIR = "rlhf_jax"            # relative to the worker's home directory
TARBALL = "rlhf_jax_code.tgz"
EXCLUDES = (".git", "runs", "__pycache__", "*.egg-info", ".venv", "venv", ".pytest_cache",
            ".jax_cache", "build", "dist")
VENV_PYTHON = ".venv/bin/python"   # relative to REMOTE_DIR
MIN_PYTHON = (3, 11)               # what jax needs


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
  p.add_argument("--python_version", default="3.11",
                 help="Python of the workers' virtual environment (uv installs it; at least "
                      f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}).")
  p.add_argument("--gcs_mount", default="/mnt/gcs",
                 help="Where a gs:// --workdir's bucket is mounted on every worker (gcsfuse).")
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
  version = re.fullmatch(r"3\.(\d+)", args.python_version)
  if not version or (3, int(version.group(1))) < MIN_PYTHON:
    p.error(f"--python_version: expected 3.N with N >= {MIN_PYTHON[1]} (jax's minimum), got "
            f"{args.python_version!r}")
  if not args.gcs_mount.startswith("/") or any(c.isspace() for c in args.gcs_mount):
    p.error(f"--gcs_mount: expected an absolute path without spaces, got {args.gcs_mount!r}")
  args.gcs_mount = args.gcs_mount.rstrip("/") or "/"
  try:
    args.bucket, args.extra = gcs_workdir(extra, args.gcs_mount)
  except ValueError as e:
    p.error(str(e))
  return args


def gcs_workdir(extra, mount):
  """(bucket or None, rlhf_jax.main args with a `--workdir=gs://BUCKET/PATH` turned into
  `--workdir=<mount>/BUCKET/PATH`). ValueError for a gs:// workdir without a bucket."""
  out, bucket, i = [], None, 0
  while i < len(extra):
    arg = extra[i]
    value = None
    if arg.startswith("--workdir="):
      value = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(extra):
      value, i = extra[i + 1], i + 1
    if value is not None and value.startswith("gs://"):
      name, _, path = value[len("gs://"):].partition("/")
      if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", name):
        raise ValueError(f"--workdir: {value!r} does not name a Cloud Storage bucket "
                         "(gs://BUCKET/PATH)")
      bucket = name
      value = posixpath.join(mount, name, path.strip("/"))
    out.append(f"--workdir={value}" if value is not None else arg)
    i += 1
  return bucket, out


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
  """A fresh ~/rlhf_jax/.venv with Python --python_version (uv, pip-installed for the user, brings
  it), then rlhf_jax and jax[tpu] into it."""
  uv = "python3 -m uv"
  return ssh_all(args, f"cd {REMOTE_DIR} && python3 -m pip install --quiet --user --upgrade uv && "
                       f"rm -rf .venv && {uv} venv --quiet --python {args.python_version} .venv && "
                       f"{uv} pip install --quiet --python {VENV_PYTHON} -e . 'jax[tpu]'")


def mount_command(args):
  """On every worker: gcsfuse (from Google's apt repository when missing) mounts the workdir's
  bucket at <--gcs_mount>/BUCKET, unless it is mounted already."""
  where = shlex.quote(posixpath.join(args.gcs_mount, args.bucket))
  keyring = "/usr/share/keyrings/cloud.google.gpg"
  install = (
      "command -v gcsfuse >/dev/null || (curl -fsSL "
      "https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
      f"sudo gpg --dearmor --yes -o {keyring} && "
      f"echo \"deb [signed-by={keyring}] https://packages.cloud.google.com/apt "
      "gcsfuse-$(lsb_release -c -s) main\" | "
      "sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
      "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse)")
  mount = (f"mountpoint -q {where} || (sudo mkdir -p {where} && "
           f"sudo chown \"$(id -u):$(id -g)\" {where} && gcsfuse --implicit-dirs "
           f"--rename-dir-limit=1000000 {shlex.quote(args.bucket)} {where})")
  return ssh_all(args, f"({install}) && {mount}")


def run_command(args):
  """The training command, run on every worker; tpu_worker.py adds the multi-host flags."""
  program = [VENV_PYTHON, "launch/tpu_worker.py", f"--port={args.port}", "--",
             VENV_PYTHON, "-m", "rlhf_jax.main", f"--config={args.config}"] + args.extra
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
  if "mount" in args.steps and args.bucket:
    lu.run(mount_command(args), "mount", args.dry_run)
  if "run" in args.steps:
    lu.run(run_command(args), "run", args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(lu.main_wrapper(main))
