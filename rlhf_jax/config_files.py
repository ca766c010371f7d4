"""Loading the stage config files (`configs/*.py`) by path, as `--config=path.py[:preset]` does.

ml-collections' config_flags runs a config file by its path, outside any package, so a config file
cannot `import` its neighbours unless their directory is on sys.path. Instead a config file that
builds on others (`configs/ppo_ptx.py` on `models.py`, `sft.py`, `rm.py`, `collect.py`,
`eval.py`) loads them by their paths next to its own:

  from rlhf_jax import config_files
  models = config_files.sibling(__file__, "models")      # configs/models.py

This works from any working directory, with the repository checked out or `pip install`ed, and
leaves sys.path and sys.modules as they were.
"""
import importlib.util
import os


def load(path):
  """The module of the Python file at `path`, run afresh (not entered in sys.modules)."""
  path = os.path.abspath(path)
  name = "rlhf_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ImportError(f"{path} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(file, name):
  """The module of the config file `<name>.py` in the directory of `file` (a config file's
  `__file__`)."""
  return load(os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py"))


def get_config(path, preset=None):
  """`get_config(preset)` of the config file at `path` (`get_config()` when preset is None): the
  ConfigDict `--config=path[:preset]` gives, before command-line overrides."""
  module = load(path)
  return module.get_config() if preset is None else module.get_config(preset)
