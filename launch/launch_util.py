"""What the launch scripts share: one-line flag errors, `--` pass-through, printing and running commands.

Standard library only: the launch scripts run on the machine that drives the cluster (a laptop
with gcloud or ssh), which need not have JAX or rlhf_jax installed.
"""
import argparse
import os
import shlex
import subprocess
import sys
from typing import Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(Exception):
  """A command failed or the user's input is wrong at run time: one line, exit status 1."""


class Parser(argparse.ArgumentParser):
  """argparse whose errors are ONE line on stderr ('error: ...') and exit status 2."""

  def error(self, message):
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def split_passthrough(argv: Sequence[str]):
  """(launcher args, args after the first '--' passed to the program unchanged)."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def shell_line(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> str:
  """The command as one POSIX shell line: `K=V ... prog 'arg with space'`."""
  prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  return " ".join(prefix + [shlex.quote(a) for a in argv])


def run(argv: Sequence[str], what: str, dry_run: bool, check: bool = True,
        capture: bool = False) -> subprocess.CompletedProcess:
  """Prints the command; runs it unless dry_run. A failure with check=True is a LaunchError."""
  print(shell_line(argv), flush=True)
  if dry_run:
    return subprocess.CompletedProcess(list(argv), 0, "", "")
  try:
    done = subprocess.run(list(argv), check=False, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
  except FileNotFoundError:
    raise LaunchError(f"{what}: {argv[0]} not found on PATH") from None
  if check and done.returncode != 0:
    detail = (done.stderr or "").strip().splitlines()
    tail = f": {detail[-1]}" if detail else ""
    raise LaunchError(f"{what}: `{shell_line(argv)[:200]}` exited with status "
                      f"{done.returncode}{tail}")
  return done


def main_wrapper(main, argv=None) -> int:
  """Runs main(argv); a LaunchError is one line on stderr and exit status 1."""
  try:
    return main(sys.argv[1:] if argv is None else argv) or 0
  except LaunchError as e:
    sys.stderr.write(f"error: {e}\n")
    return 1
  except KeyboardInterrupt:
    sys.stderr.write("error: interrupted\n")
    return 130
