"""User-facing errors and the command-line wrapper that reports them.

A `UserError` is a mistake in what the user gave us (a path, a flag, a file, a config field);
`check_positive` / `check_int` raise one that names a config field. Command line entry points run
through `run_cli`, which prints such an error as ONE line on stderr and exits with status 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""
import sys

from absl import app
from absl import flags
from absl import logging


class UserError(Exception):
  """Bad input from the user; the message names the field or file and what was expected."""


def config_field(config, dotted):
  """`config.<dotted>` (e.g. 'optimizer.lr'); KeyError/AttributeError when a part is missing."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_positive(config, dotted, kind=float, allow_zero=False):
  """One-line UserError naming `config.<dotted>` unless it is a positive number of `kind`."""
  try:
    value = config_field(config, dotted)
  except (KeyError, AttributeError):
    raise UserError(f"config.{dotted} is missing") from None
  ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    ok_type = isinstance(value, int) and not isinstance(value, bool)
  if not ok_type or not (value >= 0 if allow_zero else value > 0):
    what = "an integer" if kind is int else "a number"
    raise UserError(f"config.{dotted} must be {what} {'>= 0' if allow_zero else '> 0'}, "
                    f"got {value!r}")
  return value


def check_int(config, dotted):
  """One-line UserError naming `config.<dotted>` unless it is an integer (e.g. a seed)."""
  try:
    value = config_field(config, dotted)
  except (KeyError, AttributeError):
    raise UserError(f"config.{dotted} is missing") from None
  if not isinstance(value, int) or isinstance(value, bool):
    raise UserError(f"config.{dotted} must be an integer, got {value!r}")
  return value


def one_line(text) -> str:
  """A message on one line. config_flags puts a config file's traceback into its flag error:
  keep the first line (it names the flag) and the last (the exception)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def _config_error(argv, error) -> str:
  """One line for an exception raised while the flags ran a config file or applied a
  --config.<field> override (config_flags raises a bare AttributeError/KeyError for a field the
  config lacks)."""
  if isinstance(error, (AttributeError, KeyError)):
    key = str(error).strip("'\" ")
    for arg in argv[1:]:
      name = arg.lstrip("-").split("=", 1)[0]
      if arg.startswith("--") and "." in name and key in name.split(".")[1:]:
        return f"flag --{name}: the config has no field {key!r}"
  return f"--config: {type(error).__name__}: {one_line(error)}"


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {one_line(e)}\n")
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except  (the config file is user code)
    sys.stderr.write(f"error: {_config_error(argv, e)}\n")
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
