"""--workdir: a URL (gs://, s3://, ...) is refused in one line, exit status 2, before anything is
created (it used to become a local directory ./gs:/bucket/run, and the run crashed in orbax); on
several processes the workdir must be one directory they all see (`rlhf_jax.workdir`)."""
import os
import subprocess
import sys

import pytest

from fake_devices import xla_flags
from rlhf_jax import workdir
from rlhf_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


@pytest.mark.parametrize("url", ["gs://bucket/runs/ppo", "s3://bucket/run", "az://c/run",
                                 "hf://user/run", "gs:/bucket/run"])
def test_resolve_refuses_urls_without_touching_the_filesystem(url, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir.is_url(url)
  with pytest.raises(UserError, match="--workdir: .* is a URL .*gcsfuse.*nothing was created"):
    workdir.resolve(url)
  assert os.listdir(tmp_path) == []


def test_resolve_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert workdir.resolve("file:///srv/run") == "/srv/run"
  assert workdir.resolve("/a/b:c") == "/a/b:c" and not workdir.is_url("runs/a:b")
  assert os.listdir(tmp_path) == []


def test_one_process_check_shared_creates_nothing(tmp_path):
  workdir.check_shared(str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.parametrize("url", ["gs://bucket/runs/ppo", "s3://bucket/run"])
def test_main_with_a_url_workdir_fails_in_one_line_and_creates_nothing(url, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.main",
                         f"--config={ROOT}/configs/sft.py:tiny", "--config.stage=pretrain",
                         f"--workdir={url}"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f"error: --workdir: {url} is a URL"), lines
  assert os.listdir(tmp_path) == []


def _two_processes(tmp_path, *extra):
  from test_multihost import _finish, _free_port
  out = str(tmp_path / "result")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  procs = []
  for i in range(2):
    with open(f"{out}.{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, "--mode=workdir", f"--process_id={i}", "--num_processes=2",
           f"--port={port}", f"--out={out}", *extra], env=env, stdout=log,
          stderr=subprocess.STDOUT))
  return _finish(procs, out, timeout=240)


@pytest.mark.slow
def test_shared_workdir_passes_and_leaves_nothing(tmp_path):
  results = _two_processes(tmp_path, f"--workdir={tmp_path / 'w'}")
  assert [r["error"] for r in results] == [None, None]
  assert [r["left"] for r in results][0] in ([], None) and os.listdir(tmp_path / "w") == []


@pytest.mark.slow
def test_unshared_workdir_fails_on_every_process(tmp_path):
  """Each process given its own directory (as on hosts without a shared filesystem): both fail
  with the same one-line error naming process 1, instead of training on two copies."""
  results = _two_processes(tmp_path, f"--workdir={tmp_path / 'w'}", "--apart=1")
  for r in results:
    assert r["error"] and "is not one directory shared by every process" in r["error"]
    assert "process(es) 1 of 2" in r["error"] and "\n" not in r["error"]
  assert os.listdir(tmp_path / "w" / "0") == []       # process 0's token is removed again
