"""The run directory (--workdir): resolved and checked before anything is created.

A run reads and writes its workdir through the local filesystem: memory-mapped data, JSONL
appends, whole-directory renames of finished models, orbax checkpoints beside them. A URL
(`gs://bucket/run`, or any other scheme etils.epath or fsspec knows: s3://, az://, hf://, ...)
is therefore refused in one line (exit status 2), before anything is created, instead of becoming
a local directory `./gs:/bucket/run`. The way to run in a Cloud Storage bucket is to mount it
(gcsfuse) on every host and pass the mount point: `launch/tpu_vm.py --gcs_bucket=BUCKET` does that
on every worker of a TPU VM slice. `file:///abs/path` is the local path /abs/path.

On several processes the workdir must be ONE directory all of them see (process 0 prepares the
data the others read, and every process writes its own checkpoint shards into it): 
`check_shared` verifies that once at start-up and fails in one line on every process otherwise,
rather than leaving each host to its own copy.
"""
import os
import re

from rlhf_jax.errors import UserError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
CHECK_FILE = ".rlhf_jax_shared_check"


def is_url(path: str) -> bool:
  """Whether `path` names a location by a URL scheme (gs://..., s3://..., also gs:/... typos)."""
  return bool(_URL.match(str(path)))


def resolve(workdir: str) -> str:
  """The absolute local workdir for the --workdir value `workdir`; a UserError for a URL (or an
  empty value), without touching the filesystem."""
  workdir = str(workdir)
  match = _URL.match(workdir)
  if match and match.group(1).lower() == "file" and workdir.startswith("file://"):
    workdir = workdir[len("file://"):]
  elif match:
    scheme = match.group(1).lower()
    raise UserError(
        f"--workdir: {workdir} is a URL ({scheme}://); runs read and write their workdir through "
        "the local filesystem (memory-mapped data, directory renames): give a local path, on "
        "several hosts one that every host mounts (NFS, or the bucket mounted with gcsfuse, "
        "`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, which launch/tpu_vm.py --gcs_bucket=BUCKET "
        "does on every TPU worker); nothing was created")
  if not workdir.strip():
    raise UserError("--workdir: empty; give a directory (default: runs/<config.name>)")
  return os.path.abspath(workdir)


def check_shared(workdir: str) -> None:
  """Several processes: that `workdir` is one directory every process sees. Process 0 creates it
  and writes a random token into it; every process reads the token back; all agree on the
  outcome (a UserError on every process, naming the processes that saw another directory).
  One process: nothing (nothing is created here)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  import secrets  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from rlhf_jax import distributed  # pylint: disable=g-import-not-at-top
  token = np.asarray(multihost_utils.broadcast_one_to_all(
      np.asarray([secrets.randbits(31), secrets.randbits(31)], np.int32)))
  text = f"{int(token[0])}-{int(token[1])}"
  path = os.path.join(workdir, CHECK_FILE)
  written = ""
  if distributed.is_primary():
    try:
      os.makedirs(workdir, exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    except OSError as e:
      written = f"process 0 cannot write there ({e.strerror or e})"
  distributed.barrier("rlhf_jax_workdir_written")
  try:
    with open(path, encoding="utf-8") as f:
      ok = f.read() == text
  except OSError:
    ok = False
  seen = distributed.gather_rows(np.asarray([int(ok)], np.int32))
  distributed.barrier("rlhf_jax_workdir_read")
  if distributed.is_primary() and os.path.exists(path):
    os.remove(path)
  bad = [i for i, v in enumerate(seen) if not v]
  if written or bad:
    why = written or (f"process(es) {', '.join(map(str, bad))} of {len(seen)} do not see the "
                      "file process 0 wrote there")
    raise UserError(f"--workdir: {workdir} is not one directory shared by every process: {why}; "
                    "on several hosts give a --workdir that every host mounts (NFS, or a bucket "
                    "mounted with gcsfuse: see launch/README.md)")
