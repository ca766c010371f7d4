"""Kill and resume (issue 9): `python -m rlhf_jax.main` SIGKILLed mid-run, at a random point or
during an async checkpoint save, then re-run with the same command, ends with parameters
bit-identical to an uninterrupted run (and the same metrics records and stage metadata); a
checkpoint written with another config is refused. The harness is tests/kill_resume.py."""
import json
import os
import shutil

import pytest

import kill_resume as kr

# Small runs: 1 layer, 24 steps, a checkpoint every 4 (keep 2: old ones are deleted mid-run),
# dropout on in SFT so the step RNG matters, evaluation on 2 batches so eval records resume too.
COMMON = ["--config.model.num_layers=1", "--config.num_steps=24", "--config.checkpoint_every=4",
          "--config.log_every=4", "--config.eval_every=12", "--config.eval_batches=2"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, offline_data_dir):
  root = tmp_path_factory.mktemp("shared")
  data = offline_data_dir                 # conftest.py
  lm = kr.save_random_model(str(root / "lm"), os.path.join(data, "tokenizer"), num_layers=1)
  return data, lm


def sft_cmd(data, lm):
  return ["-m", "rlhf_jax.main", "--config=configs/sft.py:tiny", "--workdir={workdir}",
          f"--config.data.dir={data}", f"--config.init_from={lm}",
          "--config.model.dropout_resid=0.1", *COMMON]


def rm_cmd(data, lm):
  return ["-m", "rlhf_jax.main", "--config=configs/rm.py:tiny", "--workdir={workdir}",
          f"--config.data.dir={data}", f"--config.init_from={lm}", "--config.norm_examples=32",
          *COMMON]


def _records(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [(r["kind"], r["step"]) for r in map(json.loads, f)]


def _meta(workdir, stage):
  with open(os.path.join(kr.model_dir(workdir, stage), "rlhf_jax_stage.json")) as f:
    meta = json.load(f)

  def drop_timing(x):
    if isinstance(x, dict):
      return {k: drop_timing(v) for k, v in x.items() if not k.endswith("seconds")}
    return x
  return drop_timing(meta)


class Reference:
  """An uninterrupted run started in the background; `path()` waits for it once."""

  def __init__(self, cmd, workdir):
    self.workdir, self.proc, self.done = workdir, kr.start(cmd, workdir), False

  def path(self):
    if not self.done:
      kr.wait(self.proc)
      self.done = True
    return self.workdir


@pytest.fixture(scope="module")
def sft_reference(shared, tmp_path_factory):
  return Reference(sft_cmd(*shared), str(tmp_path_factory.mktemp("sft") / "reference"))


def _kill_resume_matches(tmp_path, cmd, stage, seed, during_save, reference=None):
  work = str(tmp_path / "killed")
  reference = reference or Reference(cmd, str(tmp_path / "reference"))   # runs beside the kill
  report = kr.run_and_kill(cmd, work, stage, seed=seed, max_delay=1.5, during_save=during_save)
  ref = reference.path()
  assert report.killed and not report.model_existed, report
  assert report.complete_steps, report          # killed after its first checkpoint
  if during_save:
    assert report.tmp_dirs, report              # ... while a save was in flight
  out = kr.run_to_completion(cmd, work)
  assert f"resumed from {kr.checkpoint_dir(work, stage)}/{report.complete_steps[-1]}" in out
  kr.assert_same_params(kr.model_dir(ref, stage), kr.model_dir(work, stage))
  assert kr.list_checkpoints(kr.checkpoint_dir(work, stage))[1] == []   # tmp dirs cleaned up
  assert _records(work, stage) == _records(ref, stage)    # no duplicated or lost records
  assert _meta(work, stage) == _meta(ref, stage)
  return report


@pytest.mark.slow
def test_sft_killed_at_a_random_point_resumes_bit_identically(shared, sft_reference, tmp_path):
  _kill_resume_matches(tmp_path, sft_cmd(*shared), "sft", seed=0, during_save=False,
                       reference=sft_reference)


@pytest.mark.slow
def test_rm_killed_during_an_async_save_resumes_bit_identically(shared, tmp_path):
  _kill_resume_matches(tmp_path, rm_cmd(*shared), "rm", seed=0, during_save=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage,seed,during_save", [("sft", 1, True), ("rm", 1, False)])
def test_more_kill_points(shared, sft_reference, tmp_path, stage, seed, during_save):
  cmd = (sft_cmd if stage == "sft" else rm_cmd)(*shared)
  _kill_resume_matches(tmp_path, cmd, stage, seed=seed, during_save=during_save,
                       reference=sft_reference if stage == "sft" else None)


def test_resume_with_another_config_is_refused(shared, sft_reference, tmp_path):
  """A checkpoint records its config; a changed hyperparameter is one line, exit 2, and the
  workdir is left as it was."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  work = str(tmp_path / "w")
  shutil.copytree(sft_reference.path(), work)
  shutil.rmtree(kr.model_dir(work, "sft"))     # the stage runs again from its last checkpoint
  changed = [a.replace("{workdir}", work) for a in sft_cmd(*shared)]
  changed.append("--config.optimizer.lr=0.01")
  before = _snapshot(work)
  result = subprocess.run([sys.executable, *changed], cwd=kr.ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: config.optimizer.lr is 0.01 but the "
                                                 "checkpoint "), result.stderr
  assert "was written with 0.003" in lines[0]
  assert _snapshot(work) == before


def _snapshot(root):
  out = {}
  for dirpath, dirnames, files in os.walk(root):
    for name in dirnames + files:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns) if name in files else None
  return out
