"""Evaluation: the win-rate arithmetic against brute force, the KL and the reward read on padded
prompt ++ response rows against unpadded numpy recomputations, and the whole evaluation on tiny
random models (policy == SFT gives KL 0 and a win rate near 0.5; results.json keys exactly)."""
import importlib.util
import json
import os
import shutil
import zlib

import jax
import ml_collections
import numpy as np
import pytest

from rlhf_jax import evaluate
from rlhf_jax.convert import save_model
from rlhf_jax.data import prepare
from rlhf_jax.errors import UserError
from rlhf_jax.models import Transformer, get_model_config, init_params

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
POLICY_KEYS = {"gold_win_rate_vs_sft", "gold_score", "rm_score", "kl_to_sft", "pretrain_loss"}


def hash_score(prompt, response):
  """A stand-in gold score in [0, 1): random models' garbage would score 0 under the real one."""
  return zlib.crc32(f"{prompt}\x00{response}".encode()) / 2.0 ** 32


# ----------------------------------------------------------------------------- arithmetic

def test_win_rate_matches_brute_force():
  rng = np.random.default_rng(0)
  levels = np.asarray([0.0, 0.25, 0.5, 1.0])
  policy, base = levels[rng.integers(4, size=(7, 3))], levels[rng.integers(4, size=(7, 3))]
  outcome = np.zeros((7, 3))
  for p in range(7):
    for s in range(3):
      a, b = policy[p, s], base[p, s]
      outcome[p, s] = 1.0 if a > b else 0.5 if a == b else 0.0
  assert 0 < (policy == base).sum() < 21          # the case has ties and non-ties
  per_prompt = [sum(outcome[p]) / 3 for p in range(7)]
  mean = sum(per_prompt) / 7
  se = np.sqrt(sum((m - mean) ** 2 for m in per_prompt) / 6) / np.sqrt(7)
  rate, got_se = evaluate.win_rate(policy, base)
  np.testing.assert_allclose(evaluate.win_outcomes(policy, base), outcome)
  assert rate == pytest.approx(outcome.mean()) and got_se == pytest.approx(se)
  assert evaluate.win_rate(policy, policy) == (0.5, 0.0)
  assert evaluate.win_rate(policy[:1], base[:1])[1] == 0.0
  assert evaluate.interval95(0.9, 0.1) == [pytest.approx(0.704), 1.0]


def _rows(seed=0, vocab=512, prompt_width=8, num_new=6):
  """Left-padded prompts `[bos] ids` and sampler-like responses (EOS or cut, pad after)."""
  rng = np.random.default_rng(seed)
  prompt_lens, resp_lens = [3, 5, 1, 7], [1, 4, 6, 6]
  prompts = np.zeros((4, prompt_width), np.int32)
  seg = np.zeros_like(prompts)
  out = {"tokens": np.zeros((4, num_new), np.int32), "mask": np.zeros((4, num_new), np.float32),
         "lengths": np.asarray(resp_lens, np.int32)}
  unpadded = []
  for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
    ids = np.concatenate([[1], rng.integers(3, vocab, size=p - 1)]).astype(np.int32)
    resp = rng.integers(3, vocab, size=r).astype(np.int32)
    if i % 2 == 0:
      resp[-1] = 2                                  # ends with EOS
    prompts[i, -p:], seg[i, -p:] = ids, 1
    out["tokens"][i, :r], out["mask"][i, :r] = resp, 1.0
    unpadded.append((ids, resp))
  return prompts, seg, out, unpadded


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_to_sft_matches_numpy_on_unpadded_rows():
  cfg = get_model_config("tiny")
  pi, ref = (jax.device_get(init_params(cfg, jax.random.key(k))) for k in (0, 1))
  temperature, num_new = 0.7, 6
  prompts, seg, out, unpadded = _rows(num_new=num_new)
  seqs = evaluate.sequences(prompts, seg, out, 1)
  fn = jax.jit(evaluate.make_logprob_fn(cfg, num_new, temperature))
  kl = evaluate.sequence_kl(fn(pi, seqs), fn(ref, seqs), out["mask"])
  # Each row unpadded, from position 0 (right padding after it changes nothing before it).
  rows = np.zeros((len(unpadded), 20), np.int32)
  for i, (ids, resp) in enumerate(unpadded):
    rows[i, :len(ids) + len(resp)] = np.concatenate([ids, resp])
  apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])
  logp = [_log_softmax64(np.asarray(apply(p, rows)) / temperature) for p in (pi, ref)]
  for i, (ids, resp) in enumerate(unpadded):
    terms = [sum(lp[i, len(ids) - 1 + j, resp[j]] for j in range(len(resp))) for lp in logp]
    assert kl[i] == pytest.approx(terms[0] - terms[1], abs=2e-4)
  assert np.all(evaluate.sequence_kl(fn(pi, seqs), fn(pi, seqs), out["mask"]) == 0.0)


def test_reward_is_read_at_the_last_response_token_as_in_rm_training():
  cfg = get_model_config("tiny")
  params = jax.device_get(init_params(cfg, jax.random.key(3), head="scalar"))
  prompts, seg, out, unpadded = _rows(seed=1)
  seqs = evaluate.sequences(prompts, seg, out, 1)
  got = np.asarray(jax.jit(evaluate.make_reward_fn(cfg))(params, seqs))
  rows = np.zeros((len(unpadded), 20), np.int32)     # right-padded like comparison_loader's
  segment = np.zeros_like(rows)
  for i, (ids, resp) in enumerate(unpadded):
    n = len(ids) + len(resp)
    rows[i, :n], segment[i, :n] = np.concatenate([ids, resp]), 1
  values = np.asarray(jax.jit(lambda p, x, s: Transformer(cfg, head="scalar").apply(
      {"params": p}, x, segment_ids=s)[0])(params, rows, segment))
  for i, (ids, resp) in enumerate(unpadded):
    assert got[i] == pytest.approx(values[i, len(ids) + len(resp) - 1], abs=1e-5)


# ----------------------------------------------------------------------------- end to end

def _save(path, head, seed, tok_dir, params=None, meta=None):
  cfg = get_model_config("tiny")
  if params is None:
    params = jax.device_get(init_params(cfg, jax.random.key(seed), head=head))
  save_model(path, cfg, params, fmt="rlhf_jax", head=head, tokenizer_dir=tok_dir)
  if meta is not None:
    with open(os.path.join(path, "rlhf_jax_stage.json"), "w") as f:
      json.dump(meta, f)
  return params


def eval_config(data_dir):
  spec = importlib.util.spec_from_file_location("models_config", os.path.join(ROOT, "configs",
                                                                              "models.py"))
  models = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(models)
  base = models.base_config("tiny", "evaluate")
  c = ml_collections.ConfigDict()
  c.data, c.mesh = base.data, base.mesh
  c.data.dir = data_dir
  c.eval = evaluate.default_config("tiny")
  c.eval.num_prompts, c.eval.samples_per_prompt, c.eval.batch_size = 32, 2, 8
  c.eval.max_new_tokens, c.eval.pretrain_batches, c.eval.pretrain_batch_size = 8, 2, 8
  c.eval.pretrain_seq_len, c.eval.num_examples = 64, 2
  return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  data_dir = os.path.join(workdir, "data")
  prepare.prepare_offline(data_dir)
  tok_dir = os.path.join(data_dir, "tokenizer")
  sft = _save(os.path.join(workdir, "sft", "model"), "lm", 0, tok_dir)
  _save(os.path.join(workdir, "ppo", "model"), "lm", 1, tok_dir)
  _save(os.path.join(workdir, "ppo_ptx", "model"), "lm", 0, tok_dir, params=sft)   # == SFT
  _save(os.path.join(workdir, "rm", "model"), "scalar", 2, tok_dir,
        meta={"stage": "rm", "final_eval": {"accuracy": 0.7, "gold_accuracy": 0.72}})
  config = eval_config(data_dir)
  policies = {n: os.path.join(workdir, n, "model") for n in ("sft", "ppo", "ppo_ptx")}
  results = evaluate.evaluate(config, workdir, policies, score_fn=hash_score)
  return workdir, config, results


def test_results_keys_exactly(run_dir):
  workdir, _, results = run_dir
  assert set(results) == {"sft", "ppo", "ppo_ptx", "rm", "meta"}
  for name in ("sft", "ppo", "ppo_ptx"):
    assert set(results[name]) == POLICY_KEYS
    assert all(isinstance(v, float) for v in results[name].values())
  assert results["rm"] == {"heldout_accuracy": 0.7, "gold_accuracy": 0.72}
  meta = results["meta"]
  assert meta["prompts"] == 32 and meta["samples_per_prompt"] == 2 and meta["seed"] == 0
  assert meta["temperature"] == 1.0 and meta["seconds"] > 0 and meta["pretrain_batches"] == 2
  assert meta["machine"]["device_count"] == jax.device_count()
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  assert "| policy | gold win rate vs SFT" in md and "## Sample completions" in md
  assert all(f"| {n} |" in md for n in ("sft", "ppo", "ppo_ptx"))
  assert not any(name.endswith(".tmp") for name in os.listdir(workdir))


def test_policy_equal_to_sft_has_zero_kl_and_even_win_rate(run_dir):
  _, _, results = run_dir
  se = results["meta"]["policies"]
  for name in ("sft", "ppo_ptx"):      # the same weights as the SFT model
    r = results[name]
    assert r["kl_to_sft"] == 0.0
    assert abs(r["gold_win_rate_vs_sft"] - 0.5) < 3 * se[name]["win_rate_stderr"] + 1e-9
    assert 0.0 < se[name]["win_rate_stderr"] < 0.15
  assert results["ppo_ptx"]["pretrain_loss"] == results["sft"]["pretrain_loss"]
  assert results["ppo"]["pretrain_loss"] != results["sft"]["pretrain_loss"]
  assert results["ppo"]["kl_to_sft"] != 0.0
  # Same weights, independent samples: the SFT row and the ppo_ptx row are different draws.
  assert results["ppo_ptx"]["gold_score"] != results["sft"]["gold_score"]


def test_run_evaluates_the_policies_present(run_dir, tmp_path):
  workdir, config, _ = run_dir
  shutil.move(os.path.join(workdir, "ppo_ptx"), os.path.join(tmp_path, "ppo_ptx"))
  try:
    results = evaluate.run(config, workdir)
  finally:
    shutil.move(os.path.join(tmp_path, "ppo_ptx"), os.path.join(workdir, "ppo_ptx"))
  assert set(results) == {"sft", "ppo", "rm", "meta"}
  with pytest.raises(UserError, match="sft"):
    evaluate.run(config, str(tmp_path))


@pytest.mark.parametrize("field,value", [("samples_per_prompt", 0), ("temperature", 0.0),
                                         ("batch_size", 12), ("max_new_tokens", 240)])
def test_bad_eval_config_is_one_line_user_error(run_dir, field, value):
  workdir, config, _ = run_dir
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval[field] = value
  with pytest.raises(UserError, match=f"config.eval.{field}") as e:
    evaluate.run(config, workdir)
  assert "\n" not in str(e.value)
