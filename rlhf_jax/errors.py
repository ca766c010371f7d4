"""User-facing errors and the command-line wrapper that reports them.

A `UserError` is a mistake in what the user gave us (a path, a flag, a file, a config field). Command
line entry points run through `run_cli`, which prints such an error as ONE line on stderr and exits
with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""
import sys

from absl import app
from absl import flags
from absl import logging


class UserError(Exception):
  """Bad input from the user; the message names the field or file and what was expected."""


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


def run_cli(main):
  """absl `app.run(main)` with flag errors and `UserError`s reported as one line, exit status 2."""

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:   # library INFO chatter (orbax, jax) off by default
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except UserError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)

  app.run(wrapped, flags_parser=_parse_flags)
