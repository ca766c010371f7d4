"""launch/: the GPU and TPU VM launchers print (and run) the right commands, the multi-host flags are
the ones rlhf_jax.distributed accepts, bad flags end in one line with status 2, and the Colab
notebook is a valid notebook whose Python compiles and whose commands use real flags."""
import http.server
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
sys.path.insert(0, LAUNCH)
import tpu_worker  # noqa: E402  pylint: disable=g-import-not-at-top

# A stand-in for rlhf_jax.main: parses the same multi-host flags (by importing
# rlhf_jax.distributed), checks them with resolve_settings, records what it got.
FAKE_MAIN = textwrap.dedent("""
    import json, os, sys, time
    from absl import app, flags
    from rlhf_jax import distributed
    flags.DEFINE_string("config", None, "")
    flags.DEFINE_string("out", None, "")
    flags.DEFINE_integer("fail_id", -1, "")
    F = flags.FLAGS
    def main(argv):
      settings = distributed.resolve_settings(F.coordinator_address, F.num_processes, F.process_id,
                                              env={})
      pid = F.process_id or 0
      with open(os.path.join(F.out, f"{pid}.json"), "w") as f:
        json.dump({"settings": settings, "config": F.config, "argv": argv[1:],
                   "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
      if F.fail_id >= 0:
        if pid == F.fail_id:
          sys.exit(3)
        time.sleep(60)
    app.run(main)
""")


def _run(script, *args, env=None, timeout=60):
  return subprocess.run([sys.executable, os.path.join(LAUNCH, script), *args], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, **(env or {})},
                        timeout=timeout)


def _commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) <= 1, (name, argv)
  return values[0] if values else None


# ----------------------------------------------------------------------------- gpu.py

def test_gpu_dry_run_two_hosts_two_processes_each():
  r = _run("gpu.py", "--hosts=node1,node2", "--gpus_per_host=4", "--processes_per_host=2",
           "--remote_dir=/srv/rlhf jax", "--port=9999", "--dry-run", "--",
           "--workdir=/shared/run", "--config.name=a b")
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert len(cmds) == 4
  seen = []
  for i, cmd in enumerate(cmds):
    assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", ["node1", "node2"][i // 2]]
    remote = shlex.split(cmd[4])
    assert remote[:3] == ["cd", "/srv/rlhf jax", "&&"]
    env, prog = remote[3], remote[4:]
    assert env == f"CUDA_VISIBLE_DEVICES={['0,1', '2,3'][i % 2]}"
    assert prog[:4] == ["python3", "-m", "rlhf_jax.main", "--config=configs/ppo_ptx.py"]
    assert "--workdir=/shared/run" in prog and "--config.name=a b" in prog
    seen.append((_flag(prog, "coordinator_address"), _flag(prog, "num_processes"),
                 _flag(prog, "process_id")))
  assert seen == [("node1:9999", "4", str(i)) for i in range(4)]


def test_gpu_dry_run_local_one_process_per_gpu():
  r = _run("gpu.py", "--gpus_per_host=8", "--dry-run", "--config=configs/sft.py:tiny")
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert len(cmds) == 8
  for i, cmd in enumerate(cmds):
    assert cmd[0] == f"CUDA_VISIBLE_DEVICES={i}"
    assert cmd[1:5] == [sys.executable, "-m", "rlhf_jax.main", "--config=configs/sft.py:tiny"]
    assert (_flag(cmd, "coordinator_address"), _flag(cmd, "num_processes"),
            _flag(cmd, "process_id")) == ("localhost:12355", "8", str(i))
  # One process for all GPUs of one host: no multi-host flags at all.
  r = _run("gpu.py", "--gpus_per_host=4", "--processes_per_host=1", "--dry-run")
  (cmd,) = _commands(r.stdout)
  assert cmd[0] == "CUDA_VISIBLE_DEVICES=0,1,2,3" and not any("process" in a for a in cmd)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--gpus_per_host=4", "--processes_per_host=3"], "--processes_per_host: must divide"),
    (["--gpus_per_host=0"], "--gpus_per_host: expected at least 1"),
    (["--gpus_per_host=x"], "--gpus_per_host: invalid int value"),
    (["--hosts=a,b", "--", "--workdir=/w"], "--gpus_per_host: required with remote hosts"),
    (["--hosts=localhost,b", "--gpus_per_host=1"], "--coordinator_host: required"),
    (["--hosts=a,a", "--gpus_per_host=1"], "listed twice"),
    (["--gpus_per_host=1", "--port=70000"], "--port: expected 1..65535"),
    # Several hosts: a --workdir they all mount is required (no shared-directory luck), never a URL.
    (["--hosts=a,b", "--gpus_per_host=1"], "--workdir: several hosts need `-- --workdir=DIR`"),
    (["--hosts=a,b", "--gpus_per_host=1", "--", "--config.x=1"], "--workdir: several hosts"),
    (["--gpus_per_host=1", "--", "--workdir=gs://b/run"], "--workdir: gs://b/run is a URL"),
    (["--gpus_per_host=1", "--", "--workdir", "s3://b/run"], "--workdir: s3://b/run is a URL"),
])
def test_gpu_bad_flags_one_line_exit_2(args, message):
  own, extra = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
  r = _run("gpu.py", *own, "--dry-run", *extra)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


def _fake_main(tmp_path):
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  out = tmp_path / "out"
  out.mkdir()
  env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")])}
  return out, env


def test_gpu_runs_the_processes_and_distributed_accepts_their_flags(tmp_path):
  out, env = _fake_main(tmp_path)
  r = _run("gpu.py", "--gpus_per_host=6", "--processes_per_host=3", "--module=fake_main",
           "--port=23456", "--", f"--out={out}", "extra", env=env)
  assert r.returncode == 0, r.stderr
  got = {int(p.split(".")[0]): json.load(open(out / p)) for p in os.listdir(out)}
  assert sorted(got) == [0, 1, 2]
  for i, g in got.items():
    assert g["settings"] == {"coordinator_address": "localhost:23456", "num_processes": 3,
                             "process_id": i}
    assert g["cuda"] == f"{2 * i},{2 * i + 1}"
    assert g["config"] == "configs/ppo_ptx.py" and g["argv"] == ["extra"]


def test_gpu_stops_all_processes_when_one_fails(tmp_path):
  out, env = _fake_main(tmp_path)
  start = time.monotonic()
  r = _run("gpu.py", "--gpus_per_host=3", "--module=fake_main", "--", f"--out={out}",
           "--fail_id=1", env=env, timeout=50)
  assert time.monotonic() - start < 40          # the survivors sleep 60 s unless stopped
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      "error: process 1 (host localhost) exited with status 3; stopped the others")


# ----------------------------------------------------------------------------- tpu_vm.py

TPU_ARGS = ["--name=rlhf-1", "--zone=us-central2-b", "--accelerator_type=v4-32", "--project=proj"]


def test_tpu_vm_dry_run_prints_every_step():
  r = _run("tpu_vm.py", *TPU_ARGS, "--spot", "--dry-run", "--",
           "--workdir=gs://bucket/run", "--config.ppo.batch_size=512")
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  base = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = ["--zone=us-central2-b", "--project=proj"]
  assert cmds[0] == base + ["describe", "rlhf-1"] + where + ["--format=value(state)"]
  assert cmds[1] == base + ["create", "rlhf-1"] + where + [
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
  assert cmds[2][:2] == ["tar", "-czf"] and cmds[2][-3:] == ["-C", ROOT, "."]
  assert "--exclude=.git" in cmds[2] and "--exclude=runs" in cmds[2]
  tarball = cmds[2][2]
  assert cmds[3] == base + ["scp", "rlhf-1"] + where + [tarball, "rlhf-1:rlhf_jax_code.tgz",
                                                        "--worker=all"]
  ssh = base + ["ssh", "rlhf-1"] + where + ["--worker=all"]
  for cmd in cmds[4:]:
    assert cmd[:-1] == ssh and cmd[-1].startswith("--command=")
  assert "tar -xzf rlhf_jax_code.tgz -C rlhf_jax" in cmds[4][-1]
  # install: uv (for the user, with the image's python3) makes .venv with Python 3.11, jax[tpu] in it
  assert cmds[5][-1] == (
      "--command=cd rlhf_jax && python3 -m pip install --quiet --user --upgrade uv && "
      "rm -rf .venv && python3 -m uv venv --quiet --python 3.11 .venv && "
      "python3 -m uv pip install --quiet --python .venv/bin/python -e . 'jax[tpu]'")
  # mount: the gs:// workdir's bucket, by gcsfuse, on every worker
  mount = cmds[6][-1][len("--command="):]
  assert "sudo apt-get install -y -qq gcsfuse" in mount and mount.startswith(
      "(command -v gcsfuse >/dev/null || ")
  assert mount.endswith(") && mountpoint -q /mnt/gcs/bucket || (sudo mkdir -p /mnt/gcs/bucket && "
                        "sudo chown \"$(id -u):$(id -g)\" /mnt/gcs/bucket && gcsfuse "
                        "--implicit-dirs --rename-dir-limit=1000000 bucket /mnt/gcs/bucket)")
  # run: the venv's Python; the workdir is the mounted bucket (rlhf_jax refuses gs:// URLs)
  run = shlex.split(cmds[7][-1][len("--command="):])
  assert run == ["cd", "rlhf_jax", "&&", ".venv/bin/python", "launch/tpu_worker.py",
                 "--port=8476", "--", ".venv/bin/python", "-m", "rlhf_jax.main",
                 "--config=configs/ppo_ptx.py", "--workdir=/mnt/gcs/bucket/run",
                 "--config.ppo.batch_size=512"]
  assert len(cmds) == 8
  assert not os.path.exists(os.path.dirname(tarball))       # its temporary directory is gone


def test_tpu_vm_dry_run_git_clone_and_detach():
  r = _run("tpu_vm.py", *TPU_ARGS, "--git_url=https://example.com/r.git", "--git_ref=abc123",
           "--steps=run,copy", "--detach", "--dry-run")
  assert r.returncode == 0, r.stderr
  copy, run = [c[-1][len("--command="):] for c in _commands(r.stdout)]
  assert copy == ("(test -d rlhf_jax/.git || git clone https://example.com/r.git rlhf_jax) && "
                  "git -C rlhf_jax fetch --quiet origin && "
                  "git -C rlhf_jax checkout --quiet --detach abc123")
  assert run.startswith("cd rlhf_jax && nohup .venv/bin/python launch/tpu_worker.py")
  assert run.endswith("> run.log 2>&1 < /dev/null &")


def test_tpu_vm_dry_run_python_version_mount_point_and_local_workdir():
  r = _run("tpu_vm.py", *TPU_ARGS, "--steps=install,mount,run", "--python_version=3.12",
           "--gcs_mount=/data/gcs/", "--dry-run", "--", "--workdir", "gs://b-1/x/y/")
  assert r.returncode == 0, r.stderr
  install, mount, run = [c[-1][len("--command="):] for c in _commands(r.stdout)]
  assert "uv venv --quiet --python 3.12 .venv" in install
  assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 b-1 /data/gcs/b-1)" in mount
  assert shlex.split(run)[-1] == "--workdir=/data/gcs/b-1/x/y"
  # No gs:// workdir: no mount step; the workdir is passed as given (rlhf_jax checks at start-up
  # that every host sees it).
  r = _run("tpu_vm.py", *TPU_ARGS, "--steps=install,mount,run", "--dry-run", "--",
           "--workdir=/shared/run")
  assert r.returncode == 0, r.stderr
  install, run = [c[-1][len("--command="):] for c in _commands(r.stdout)]
  assert "gcsfuse" not in install + run and shlex.split(run)[-1] == "--workdir=/shared/run"


@pytest.mark.parametrize("args, message", [
    (["--zone=z"], "the following arguments are required: --name"),
    (["--name=a", "--zone=z", "--steps=copy,deploy"], "--steps: expected a comma-separated"),
    (["--name=a", "--zone=z", "--steps="], "--steps: expected a comma-separated"),
    (["--name=a b", "--zone=z"], "--name: expected a non-empty value without spaces"),
    (["--name=a", "--zone=z", "--port=0"], "--port: expected 1..65535"),
    (["--name=a", "--zone=z", "--wat"], "unrecognized arguments: --wat"),
    (["--name=a", "--zone=z", "--python_version=3.10"], "--python_version: expected 3.N with N >= 11"),
    (["--name=a", "--zone=z", "--python_version=py3"], "--python_version: expected 3.N"),
    (["--name=a", "--zone=z", "--gcs_mount=mnt"], "--gcs_mount: expected an absolute path"),
    (["--name=a", "--zone=z", "--", "--workdir=gs://"], "does not name a Cloud Storage bucket"),
    (["--name=a", "--zone=z", "--", "--workdir=gs://A_B/run"], "does not name a Cloud Storage"),
])
def test_tpu_vm_bad_flags_one_line_exit_2(args, message):
  own, extra = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
  r = _run("tpu_vm.py", *own, "--dry-run", *extra)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    with open(os.environ["FAKE_LOG"], "a") as f:
      f.write(json.dumps(sys.argv[1:]) + "\\n")
    verb = sys.argv[4]
    if verb == "describe":
      state = os.environ.get("FAKE_STATE", "")
      if not state:
        sys.stderr.write("ERROR: NOT_FOUND\\n")
        sys.exit(1)
      print(state)
    if verb == "scp" and os.environ.get("FAKE_COPY_TO"):
      import shutil
      shutil.copy(sys.argv[-3], os.environ["FAKE_COPY_TO"])
    if verb == os.environ.get("FAKE_FAIL"):
      sys.stderr.write("ERROR: (gcloud) permission denied\\n")
      sys.exit(5)
""")


def _fake_gcloud(tmp_path, **env):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "gcloud.log"
  if log.exists():
    log.unlink()
  full = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), **env}
  return full, log


def _verbs(log):
  return [json.loads(line)[3] for line in open(log)] if log.exists() else []


def test_tpu_vm_runs_create_copy_install_run_in_order(tmp_path):
  env, log = _fake_gcloud(tmp_path, FAKE_COPY_TO=str(tmp_path / "copied.tgz"))
  r = _run("tpu_vm.py", *TPU_ARGS, env=env)
  assert r.returncode == 0, r.stderr
  assert _verbs(log) == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  with tarfile.open(tmp_path / "copied.tgz") as t:     # the code went, the runs and .git did not
    names = {n.lstrip("./") for n in t.getnames()}
  assert {"setup.py", "rlhf_jax/report.py", "launch/tpu_worker.py"} <= names
  assert not any(n.startswith((".git/", "runs/")) or "__pycache__" in n for n in names)
  # An existing READY TPU is reused; only the steps asked for run.
  env, log = _fake_gcloud(tmp_path, FAKE_STATE="READY")
  r = _run("tpu_vm.py", *TPU_ARGS, "--steps=create,run", env=env)
  assert r.returncode == 0, r.stderr
  assert _verbs(log) == ["describe", "ssh"] and "reusing TPU rlhf-1" in r.stdout
  # A gs:// workdir adds the mount step, between install and run.
  env, log = _fake_gcloud(tmp_path, FAKE_STATE="READY")
  r = _run("tpu_vm.py", *TPU_ARGS, "--steps=install,run,mount", "--", "--workdir=gs://bkt/run",
           env=env)
  assert r.returncode == 0, r.stderr
  install, mount, run = [json.loads(line)[-1] for line in open(log)]
  assert "uv venv" in install and "gcsfuse" in mount and "--workdir=/mnt/gcs/bkt/run" in run


def test_tpu_vm_stops_at_the_first_failure_with_one_line(tmp_path):
  env, log = _fake_gcloud(tmp_path, FAKE_FAIL="scp")
  r = _run("tpu_vm.py", *TPU_ARGS, env=env)
  assert r.returncode == 1 and _verbs(log) == ["describe", "create", "scp"]
  # gcloud's own output streams through; the launcher adds one line of its own, last.
  assert r.stderr.splitlines()[0] == "ERROR: (gcloud) permission denied"
  (line,) = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert line == r.stderr.splitlines()[-1]
  assert line.startswith("error: copy: `gcloud compute tpus tpu-vm scp rlhf-1")
  assert line.endswith("exited with status 5")
  env, log = _fake_gcloud(tmp_path, FAKE_STATE="PREEMPTED")
  r = _run("tpu_vm.py", *TPU_ARGS, env=env)
  assert r.returncode == 1 and _verbs(log) == ["describe"]
  assert r.stderr == ("error: TPU rlhf-1 exists in state PREEMPTED, not READY (start or delete "
                      "it, or choose another --name)\n")
  r = _run("tpu_vm.py", *TPU_ARGS, env={"PATH": str(tmp_path / "empty")})
  assert r.returncode == 1 and r.stderr == "error: describe: gcloud not found on PATH\n"


# ----------------------------------------------------------------------------- tpu_worker.py

class _Metadata(http.server.BaseHTTPRequestHandler):
  values = {}

  def do_GET(self):  # noqa: N802
    key = self.path.rsplit("/", 1)[-1]
    ok = self.headers.get("Metadata-Flavor") == "Google" and key in self.values
    body = (self.values[key] if ok else "not found").encode()
    self.send_response(200 if ok else 404)
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def metadata_server(monkeypatch):
  server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  address = f"127.0.0.1:{server.server_address[1]}"
  monkeypatch.setenv("GCE_METADATA_IP", address)
  yield address
  server.shutdown()
  server.server_close()


ENDPOINTS = "unknown:unknown:10.0.0.7,unknown:unknown:10.0.0.3,unknown:unknown:10.0.0.9,u:u:10.0.0.2"


def test_tpu_worker_flags_for_every_worker(metadata_server, capsys):
  seen = []
  for worker in range(4):
    _Metadata.values = {"agent-worker-number": str(worker), "worker-network-endpoints": ENDPOINTS}
    assert tpu_worker.main(["--dry-run", "--port=8476", "--", "python3", "-m", "rlhf_jax.main",
                            "--config=c.py"]) == 0
    (cmd,) = _commands(capsys.readouterr().out)
    assert cmd[:4] == ["python3", "-m", "rlhf_jax.main", "--config=c.py"]
    seen.append((_flag(cmd, "coordinator_address"), _flag(cmd, "num_processes"),
                 _flag(cmd, "process_id")))
  assert seen == [("10.0.0.7:8476", "4", str(i)) for i in range(4)]
  _Metadata.values = {"agent-worker-number": "0", "worker-network-endpoints": "u:u:10.0.0.7"}
  tpu_worker.main(["--dry-run", "--", "prog"])                 # one host: no flags
  assert capsys.readouterr().out == "prog\n"
  _Metadata.values = {"agent-worker-number": "5", "worker-network-endpoints": ENDPOINTS}
  with pytest.raises(tpu_worker.lu.LaunchError, match="5 is not in"):
    tpu_worker.main(["--dry-run", "--", "prog"])


def test_tpu_worker_execs_the_command_with_flags_distributed_accepts(metadata_server, tmp_path):
  out, env = _fake_main(tmp_path)
  _Metadata.values = {"agent-worker-number": "2", "worker-network-endpoints": ENDPOINTS}
  r = _run("tpu_worker.py", "--port=1234", "--", sys.executable, "-m", "fake_main",
           "--config=c.py", f"--out={out}", env=env)
  assert r.returncode == 0, r.stderr
  got = json.load(open(out / "2.json"))
  assert got["settings"] == {"coordinator_address": "10.0.0.7:1234", "num_processes": 4,
                             "process_id": 2}


def test_tpu_worker_errors(tmp_path):
  r = _run("tpu_worker.py")
  assert r.returncode == 2 and r.stderr.startswith("error: no command") and r.stderr.count("\n") == 1
  dead = {"GCE_METADATA_IP": "127.0.0.1:9"}
  r = _run("tpu_worker.py", "--", "prog", env=dead)
  assert r.returncode == 1 and r.stderr.count("\n") == 1
  assert "metadata key agent-worker-number: cannot read" in r.stderr
  # Explicit flags win and need no metadata server.
  r = _run("tpu_worker.py", "--dry-run", "--", "prog", "--process_id=1", env=dead)
  assert r.returncode == 0 and r.stdout == "prog --process_id=1\n"


# ----------------------------------------------------------------------------- notebook

NOTEBOOK = os.path.join(LAUNCH, "colab_quickstart.ipynb")


def _notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _code_cells(nb):
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_and_its_python_compiles():
  nb = _notebook()
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  cells = _code_cells(nb)
  assert len(cells) >= 6
  for i, src in enumerate(cells):
    python = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%")))
    compile(python, f"{NOTEBOOK}:cell{i}", "exec")
  try:
    import nbformat  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))


def _defined_flags(module_path):
  src = open(os.path.join(ROOT, module_path)).read()
  return set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", src))


def test_notebook_commands_use_real_flags_and_files():
  text = "\n".join(_code_cells(_notebook()))
  uses = {"rlhf_jax.generate": "rlhf_jax/generate.py", "rlhf_jax.convert": "rlhf_jax/convert.py",
          "rlhf_jax.main": "rlhf_jax/main.py"}
  for module, path in uses.items():
    allowed = _defined_flags(path) | _defined_flags("rlhf_jax/distributed.py")
    lines = [l for l in text.splitlines() if module in l]
    assert lines, module
    for line in lines:
      for flag in re.findall(r"--(\w+)=?", line):
        assert flag in allowed, (module, flag)
  assert "--config=configs/ppo_ptx.py" in text
  if not os.path.exists(os.path.join(ROOT, "configs", "ppo_ptx.py")):
    pytest.skip("configs/ppo_ptx.py is not in the tree yet")
