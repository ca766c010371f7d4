"""Repository rules that are cheap to check: CI runs the README's commands; no unsafe loading."""
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _read(path):
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


def _code_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
  """The README's second block (install the test extras, then pytest) is what .ci/run runs, line
  for line and in order; then, last, the tests marked slow that the default suite skips."""
  blocks = _code_blocks(_read("README.md"))
  assert len(blocks) >= 2
  test_lines = [l.strip() for l in blocks[1].strip().splitlines()]
  assert test_lines[-1].startswith("pytest ")
  ci_lines = [l.strip() for l in _read(".ci/run").splitlines()]
  assert ci_lines[-1] == test_lines[-1] + " -m slow"
  assert ci_lines[-1 - len(test_lines):-1] == test_lines


def _python_files():
  for top in ("rlhf_jax", "configs", "launch", "benchmarks"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          yield os.path.join(dirpath, f)


def test_no_trust_remote_code_and_no_unpickling():
  for path in _python_files():
    text = open(path).read()
    assert not re.search(r"trust_remote_code\s*=\s*True", text), path
    assert not re.search(r"\bpickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True", text), path
