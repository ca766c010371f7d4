"""User-facing errors and the command-line wrapper that reports them.

A `UserError` is a mistake in what the user gave us (a path, a flag, a file, a config field);
`check_positive` / `check_int` raise one that names a config field. Command line entry points run
through `run_cli`, which prints such an error as ONE line on stderr and exits with status 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""
import difflib
import re
import sys

from absl import app
from absl import flags
from absl import logging

from rlhf_jax import config_files


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


def _config_path(argv):
  """(path, preset or None) of the `--config=path[:preset]` argument, or None."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path, _, preset = arg[len("--config="):].partition(":")
      return path, preset or None
  return None


def _dotted_fields(node, prefix=""):
  """Every dotted field name of a ConfigDict (nested ones and their parents)."""
  out = []
  for key in node.keys():
    out.append(prefix + key)
    child = node[key]
    if hasattr(child, "keys") and hasattr(child, "to_dict"):
      out += _dotted_fields(child, f"{prefix}{key}.")
  return out


def closest_fields(argv, parents, key):
  """Fields of the `--config` file that `key` may have meant: a sibling under `parents`
  (difflib), else the fields elsewhere in the config named `key` (up to 3, the config's own
  stage's first), else the one whose last part is closest to it; [] when nothing is close or the
  config cannot be loaded."""
  found = _config_path(argv)
  if found is None:
    return []
  try:
    config = config_files.get_config(*found)
    node = config
    for part in parents:
      node = node[part]
    siblings = difflib.get_close_matches(key, list(node.keys()), n=1)
  except Exception:  # pylint: disable=broad-except  (the config file is user code)
    return []
  if siblings:
    return [".".join(["config", *parents, siblings[0]])]
  fields = _dotted_fields(config)
  same = [f for f in fields if f.rsplit(".", 1)[-1] == key]
  if same:
    stage = f"{config.get('stage', '')}."
    return [f"config.{f}" for f in sorted(same, key=lambda f: not f.startswith(stage))[:3]]
  names = difflib.get_close_matches(key, [f.rsplit(".", 1)[-1] for f in fields], n=1)
  return [f"config.{f}" for f in fields if names and f.rsplit(".", 1)[-1] == names[0]][:1]


def _missing_field(argv, error):
  """'--config.a.b: no such field; did you mean --config.a.c?' when `error` (a KeyError or
  AttributeError from config_flags) is about a field named in a --config.<field> override;
  else None."""
  inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else error
  text = str(inner.args[0]) if inner.args else str(inner)
  lines = text.strip().splitlines()
  key = lines[0].strip("'\" ") if lines else ""
  hint = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    parts = name.split(".")
    if arg.startswith("--") and key and key in parts[1:]:
      i = parts.index(key, 1)
      guesses = ([".".join(parts[:i] + [hint.group(1)])] if hint
                 else closest_fields(argv, parts[1:i], key))
      rest = "".join("." + p for p in parts[i + 1:])
      if not guesses:
        return f"--{name}: no such field"
      named = [f"--{g}{rest}" for g in guesses]
      said = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"
      return f"--{name}: no such field; did you mean {said}?"
  return None


_BAD_VALUE = re.compile(r"^flag --(config\.[\w.]+)=(.*?): (?:could not convert string to "
                        r"(float)|invalid literal for (int)\(\) with base 10|\('Non-(boolean) "
                        r"argument)")


def flag_error(text) -> str:
  """One line for an absl flag error; a --config.<field> value of the wrong type reads
  '--config.seed: expected an integer, got '1.5''."""
  text = one_line(text)
  bad = _BAD_VALUE.match(text)
  if bad:
    what = {"float": "a number", "int": "an integer", "boolean": "true or false"}[
        next(g for g in bad.groups()[2:] if g)]
    return f"--{bad.group(1)}: expected {what}, got {bad.group(2)!r}"
  return text


def _config_error(argv, error) -> str:
  """One line for an exception raised while the flags ran a config file or applied a
  --config.<field> override (config_flags raises a bare AttributeError/KeyError for a field the
  config lacks, with its own 'Did you mean' on a second line for nested fields)."""
  if isinstance(error, (AttributeError, KeyError)):
    missing = _missing_field(argv, error)
    if missing:
      return missing
  return f"--config: {type(error).__name__}: {one_line(error)}"


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {flag_error(e)}\n")
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
