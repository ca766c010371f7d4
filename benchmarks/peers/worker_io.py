"""What every benchmark worker and driver shares (standard library only: each peer worker runs in
its own venv).

A worker prints exactly one line on its real stdout, the last: `RESULT {json}`. Everything else
(library chatter, progress) goes to stderr.
"""
import importlib.metadata
import json
import os
import sys


def claim_stdout():
  """Sends fd 1 to stderr from now on and returns a file on the original stdout (for the RESULT)."""
  real_stdout = os.fdopen(os.dup(1), "w")
  sys.stdout.flush()
  os.dup2(2, 1)
  return real_stdout


def package_version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def emit_result(real_stdout, result):
  sys.stderr.flush()
  real_stdout.write("RESULT " + json.dumps(result) + "\n")
  real_stdout.flush()


def read_result(stdout):
  """The dict of a worker's last `RESULT` line, or None."""
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  return json.loads(lines[-1][len("RESULT "):]) if lines else None
