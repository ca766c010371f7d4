"""Evaluation: the win-rate arithmetic against brute force and on a policy known to be better,
best-of-N selection against brute force and its KL against exact enumeration, the style and RM
accuracy aggregation on hand-made data, the KL and the reward read on padded prompt ++ response
rows against unpadded numpy recomputations, and the whole evaluation on tiny random models (policy
== SFT gives KL 0 and a win rate near 0.5; a policy whose answers the score prefers wins > 0.9;
best-of-N by gold wins N/(N+1) of a continuous score; results.json keys exactly)."""
import importlib.util
import itertools
import json
import math
import os
import shutil
import zlib

import jax
import ml_collections
import numpy as np
import pytest

from rlhf_jax import config_files, eval_metrics, eval_results, eval_rm_accuracy, evaluate, rollout
from rlhf_jax.convert import save_model
from rlhf_jax.data import gold_labeler, load_tokenizer, offline_task, prepare
from rlhf_jax.errors import UserError
from rlhf_jax.models import Transformer, get_model_config, init_params

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ROW_KEYS = set(eval_metrics.METRICS) | {"gold_by_family"}


MARK = "apple"    # the first word of the answers of the policy known to be better


def hash_score(prompt, response):
  """A stand-in gold score (random models' garbage would score 0 under the real one): a hash in
  [0, 1), plus 1 for a response starting with MARK, so the policy that always says it is strictly
  better than SFT (random models start a response with it about once in 500)."""
  bonus = 1.0 if response.split()[:1] == [MARK] else 0.0
  return bonus + zlib.crc32(f"{prompt}\x00{response}".encode()) / 2.0 ** 32


# ----------------------------------------------------------------------------- arithmetic

def test_win_rate_matches_brute_force():
  rng = np.random.default_rng(0)
  levels = np.asarray([0.0, 0.25, 0.5, 1.0])
  policy, base = levels[rng.integers(4, size=(7, 3))], levels[rng.integers(4, size=(7, 5))]
  per_prompt = []
  for p in range(7):
    outcomes = []
    for a in range(3):
      for b in range(5):
        x, y = policy[p, a], base[p, b]
        outcomes.append(1.0 if x > y else 0.5 if x == y else 0.0)
    per_prompt.append(sum(outcomes) / len(outcomes))
  assert 0 < (policy[:, :, None] == base[:, None, :]).sum() < 105   # ties and non-ties
  mean = sum(per_prompt) / 7
  se = np.sqrt(sum((m - mean) ** 2 for m in per_prompt) / 6) / np.sqrt(7)
  rate, got_se = eval_metrics.win_rate(policy, base)
  assert rate == pytest.approx(mean) and got_se == pytest.approx(se)
  np.testing.assert_allclose(eval_metrics.win_outcomes([0.1, 0.2, 0.3], [0.2, 0.2, 0.2]),
                             [0.0, 0.5, 1.0])
  assert eval_metrics.win_rate(policy, policy) == (pytest.approx(0.5), pytest.approx(0.0, abs=1e-12))
  assert eval_metrics.win_rate(policy[:1], base[:1])[1] == 0.0
  assert eval_metrics.interval95(0.9, 0.1) == [pytest.approx(0.704), 1.0]


def test_win_rate_of_a_policy_known_to_be_better():
  rng = np.random.default_rng(1)
  base = rng.uniform(0.0, 0.6, size=(50, 4))
  better = rng.uniform(0.0, 0.6, size=(50, 4)) + 0.4     # mostly above every baseline sample
  rate, se = eval_metrics.win_rate(better, base)
  assert rate > 0.9 and 0 < se < 0.05
  worse, worse_se = eval_metrics.win_rate(base, better)
  assert worse < 0.1 and worse == pytest.approx(1.0 - rate) and worse_se == pytest.approx(se)
  assert eval_metrics.win_rate(base + 1.0, base) == (1.0, 0.0)
  # Ties everywhere give exactly one half, not a win or a loss.
  assert eval_metrics.win_rate(np.full((5, 3), 0.7), np.full((5, 2), 0.7)) == (0.5, 0.0)
  # Independent draws of the same distribution: about one half.
  same, same_se = eval_metrics.win_rate(rng.uniform(size=(400, 4)), rng.uniform(size=(400, 4)))
  assert abs(same - 0.5) < 4 * same_se


def test_best_of_n_matches_brute_force():
  rng = np.random.default_rng(2)
  scores = rng.integers(0, 4, size=(30, 12)).astype(float)     # many ties
  for n in (1, 2, 3, 4, 5, 12):
    got = eval_metrics.best_of_n(scores, n)
    assert got.shape == (30, 12 // n)
    for p in range(30):
      for g in range(12 // n):
        group = list(scores[p, g * n:(g + 1) * n])
        assert got[p, g] == g * n + group.index(max(group))    # the first of the best
  with pytest.raises(ValueError):
    eval_metrics.best_of_n(scores, 13)


def _best_of_n_exact(p, n):
  """Exact distribution of the best of n i.i.d. draws from p (outcome i has score i, distinct):
  P(best <= i) = F(i)^n."""
  cdf = np.cumsum(p)
  return np.diff(np.concatenate([[0.0], cdf ** n]))


def _kl(q, p):
  keep = q > 0
  return float(np.sum(q[keep] * np.log(q[keep] / p[keep])))


def test_best_of_n_kl_against_exact_enumeration():
  rng = np.random.default_rng(3)
  p = rng.dirichlet(np.ones(5))
  for n in (1, 2, 3):
    # Enumerate every n-tuple of outcomes, pick with best_of_n, accumulate the pick's law.
    q = np.zeros(5)
    for draw in itertools.product(range(5), repeat=n):
      weight = np.prod(p[list(draw)])
      pick = eval_metrics.best_of_n(np.asarray([draw], float), n)[0, 0]
      q[draw[pick]] += weight
    np.testing.assert_allclose(q, _best_of_n_exact(p, n), atol=1e-12)
    # Discrete scores tie: the analytic value is an upper bound.
    assert _kl(q, p) <= eval_metrics.best_of_n_kl(n) + 1e-12
  assert eval_metrics.best_of_n_kl(1) == 0.0
  # Many small outcomes (a nearly continuous score): the exact KL reaches the analytic one.
  fine = rng.dirichlet(np.ones(200_000))
  for n in (2, 4, 16):
    exact = _kl(_best_of_n_exact(fine, n), fine)
    assert exact == pytest.approx(eval_metrics.best_of_n_kl(n), abs=2e-3)
  assert eval_metrics.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_style_metrics_on_hand_made_responses():
  sort = offline_task.make_prompt("sort", {"items": ["pear", "fig", "apple"]})
  count = offline_task.make_prompt("count", {"word": "fig", "items": ["fig", "kiwi", "fig"]})
  add = offline_task.make_prompt("add", {"a": 23, "b": 58})
  cases = [(sort, " apple fig pear"),           # right
           (sort, " apple fig pear ok"),        # right + filler
           (sort, " apple plum fig pear"),      # hallucinated plum
           (count, " 2 kiwi sure"),              # kiwi IS in the list: no hallucination; filler
           (count, " 2 lemon"),                 # lemon is not: hallucination
           (add, " 81 done")]                   # add: no list, filler
  analyses = [gold_labeler.analyze(p, r) for p, r in cases]
  arrays = eval_metrics.analysis_arrays(analyses, (2, 3))
  got = eval_metrics.style_metrics(arrays)
  content = [1.0, 1.0, 0.75, 0.5, 0.5, 1.0]
  assert [a["content"] for a in analyses] == pytest.approx(content)
  assert got["content_score"] == pytest.approx(np.mean(content))
  assert got["filler_rate"] == pytest.approx(3 / 6)
  assert got["hallucination_rate"] == pytest.approx(2 / 5)     # 2 of the 5 non-add responses
  gold = [a["gold"] for a in analyses]
  assert got["gold_by_family"] == {"sort": pytest.approx(np.mean(gold[:3])),
                                   "count": pytest.approx(np.mean(gold[3:5])),
                                   "add": pytest.approx(gold[5])}
  assert list(got["gold_by_family"]) == ["sort", "count", "add"]
  # Picking columns, and a given gold array replacing the analysis' own.
  picked = eval_metrics.take_columns(arrays, np.asarray([[0], [2]]))
  assert eval_metrics.style_metrics(picked, gold=np.asarray([[0.3], [0.9]])) == {
      "content_score": pytest.approx(1.0), "filler_rate": 0.5, "hallucination_rate": 0.0,
      "gold_by_family": {"sort": 0.3, "add": 0.9}}
  only_add = eval_metrics.analysis_arrays([gold_labeler.analyze(add, " 81")], (1, 1))
  assert eval_metrics.style_metrics(only_add)["hallucination_rate"] is None


def test_rm_accuracy_tables_match_brute_force():
  rng = np.random.default_rng(4)
  n, k = 40, 5
  rewards = rng.normal(size=(n, k))
  gold = rng.integers(0, 5, size=(n, k)) / 4.0 * rng.choice([1.0, 0.3], size=(n, 1))
  ranks = rng.integers(0, 3, size=(n, k))
  valid = (np.arange(k)[None, :] < rng.integers(2, k + 1, size=(n, 1))).astype(float)
  families = [("sort", "count", "add")[i % 3] for i in range(n)]
  got = eval_rm_accuracy.rm_accuracy_tables(rewards, ranks, valid, gold, families)

  def brute(select):
    acc = {"label": [0.0, 0], "gold": [0.0, 0], "lg": [0.0, 0]}
    for r in range(n):
      for i in range(k):
        for j in range(k):
          if i == j or not (valid[r, i] and valid[r, j]) or not select(r, i, j):
            continue
          hit = lambda a, b: 1.0 if a > b else 0.5 if a == b else 0.0
          if ranks[r, i] < ranks[r, j]:
            acc["label"][0] += hit(rewards[r, i], rewards[r, j])
            acc["label"][1] += 1
          if gold[r, i] > gold[r, j]:
            acc["gold"][0] += hit(rewards[r, i], rewards[r, j])
            acc["gold"][1] += 1
            acc["lg"][0] += hit(-ranks[r, i], -ranks[r, j])
            acc["lg"][1] += 1
    div = lambda c: c[0] / c[1] if c[1] else None
    return {"pairs": acc["label"][1], "accuracy": div(acc["label"]),
            "gold_pairs": acc["gold"][1], "gold_accuracy": div(acc["gold"]),
            "label_gold_accuracy": div(acc["lg"])}

  assert got["overall"] == pytest.approx(brute(lambda r, i, j: True))
  for f in ("sort", "count", "add"):
    assert got["by_family"][f] == pytest.approx(brute(lambda r, i, j: families[r] == f))
  gap = lambda r, i, j: abs(gold[r, i] - gold[r, j])
  assert list(got["by_gold_gap"]) == ["0", "(0, 0.1]", "(0.1, 0.25]", "(0.25, 0.5]", "> 0.5"]
  assert got["by_gold_gap"]["0"] == pytest.approx(brute(lambda r, i, j: gap(r, i, j) == 0))
  assert got["by_gold_gap"]["0"]["gold_pairs"] == 0
  assert got["by_gold_gap"]["(0.1, 0.25]"] == pytest.approx(
      brute(lambda r, i, j: 0.1 < gap(r, i, j) <= 0.25))
  assert got["by_gold_gap"]["> 0.5"] == pytest.approx(brute(lambda r, i, j: gap(r, i, j) > 0.5))
  assert sum(b["pairs"] for b in got["by_gold_gap"].values()) == got["overall"]["pairs"]
  assert all(b["pairs"] > 0 for b in got["by_gold_gap"].values())


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
  seqs = rollout.sequences(prompts, seg, out, 1)
  fn = jax.jit(rollout.make_logprob_fn(cfg, num_new, temperature))
  kl = eval_metrics.sequence_kl(fn(pi, seqs), fn(ref, seqs), out["mask"])
  # Each row unpadded, from position 0 (right padding after it changes nothing before it).
  rows = np.zeros((len(unpadded), 20), np.int32)
  for i, (ids, resp) in enumerate(unpadded):
    rows[i, :len(ids) + len(resp)] = np.concatenate([ids, resp])
  apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])
  logp = [_log_softmax64(np.asarray(apply(p, rows)) / temperature) for p in (pi, ref)]
  for i, (ids, resp) in enumerate(unpadded):
    terms = [sum(lp[i, len(ids) - 1 + j, resp[j]] for j in range(len(resp))) for lp in logp]
    assert kl[i] == pytest.approx(terms[0] - terms[1], abs=2e-4)
  assert np.all(eval_metrics.sequence_kl(fn(pi, seqs), fn(pi, seqs), out["mask"]) == 0.0)


def test_reward_is_read_at_the_last_response_token_as_in_rm_training():
  cfg = get_model_config("tiny")
  params = jax.device_get(init_params(cfg, jax.random.key(3), head="scalar"))
  prompts, seg, out, unpadded = _rows(seed=1)
  seqs = rollout.sequences(prompts, seg, out, 1)
  got = np.asarray(jax.jit(rollout.make_reward_fn(cfg))(params, seqs))
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
  c.eval = config_files.get_config(os.path.join(ROOT, "configs", "eval.py"), "tiny")
  c.eval.num_prompts, c.eval.samples_per_prompt, c.eval.batch_size = 32, 2, 8
  c.eval.max_new_tokens, c.eval.pretrain_batches, c.eval.pretrain_batch_size = 8, 2, 8
  c.eval.pretrain_seq_len, c.eval.num_examples = 64, 2
  return c


def always(params, token_id):
  """Weights of a policy that says `token_id` after every token: the layers add nothing to the
  residual stream and the (tied) embedding gives that token by far the largest logit."""
  params = jax.tree.map(np.array, params)
  params["embed"][:, 0] = 50.0
  params["embed"][token_id, 0] = 500.0
  params["layers"]["attn"]["o"]["kernel"][:] = 0.0
  params["layers"]["mlp"]["down"]["kernel"][:] = 0.0
  return params


def probe_prefers_mark(prompt, response):
  """The real probe score, except that a continuation starting with MARK is right (so a probe that
  reads another model's continuations shows)."""
  return 1.0 if response.split()[:1] == [MARK] else REAL_PROBE_SCORE(prompt, response)


REAL_PROBE_SCORE = gold_labeler.probe_score
DPO_META = {"stage": "dpo", "beta": 0.1, "final_eval": {"accuracy": 0.66, "gold_accuracy": 0.61}}
PPO_CURVE = [{"kind": "train", "step": s, "kl": 0.5 * s, "reward": 0.1 * s,
              "gold_score": 0.2 + 0.05 * s - 0.01 * s * s} for s in range(1, 6)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  data_dir = os.path.join(workdir, "data")
  prepare.prepare_offline(data_dir)
  tok_dir = os.path.join(data_dir, "tokenizer")
  sft = _save(os.path.join(workdir, "sft", "model"), "lm", 0, tok_dir)
  _save(os.path.join(workdir, "pretrain", "model"), "lm", 4, tok_dir)
  mark = load_tokenizer(tok_dir).encode(" " + MARK)
  assert len(mark) == 1
  ppo = always(init_params(get_model_config("tiny"), jax.random.key(1)), mark[0])
  _save(os.path.join(workdir, "ppo", "model"), "lm", 1, tok_dir, params=ppo)   # MARK MARK ...
  _save(os.path.join(workdir, "ppo_ptx", "model"), "lm", 0, tok_dir, params=sft)   # == SFT
  _save(os.path.join(workdir, "ppo_oracle", "model"), "lm", 3, tok_dir)
  _save(os.path.join(workdir, "dpo", "model"), "lm", 5, tok_dir, meta=DPO_META)
  _save(os.path.join(workdir, "rm", "model"), "scalar", 2, tok_dir,
        meta={"stage": "rm", "final_eval": {"accuracy": 0.7, "gold_accuracy": 0.72}})
  with open(os.path.join(workdir, "ppo", "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in PPO_CURVE))
  # The held-out comparisons of the collect stage: here the offline task's own.
  shutil.copytree(os.path.join(data_dir, "tfds", "rlhf_comparisons"),
                  os.path.join(workdir, "collect", "tfds", "rlhf_comparisons"))
  config = eval_config(data_dir)
  config.eval.best_of, config.eval.probe_prompts = (2, 4), 16
  policies = {n: os.path.join(workdir, n, "model") for n in ("sft", "ppo", "ppo_ptx",
                                                              "ppo_oracle", "dpo")}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gold_labeler, "probe_score", probe_prefers_mark)
    results = evaluate.evaluate(config, workdir, policies, score_fn=hash_score,
                                base_path=os.path.join(workdir, "pretrain", "model"))
  return workdir, config, results


def test_results_keys_exactly(run_dir):
  workdir, _, results = run_dir
  policies = ("sft", "ppo", "ppo_ptx", "ppo_oracle", "dpo")
  assert set(results) == {"base", *policies, "best_of_n", "rm", "meta"}
  for name in policies:
    assert set(results[name]) == ROW_KEYS
    assert all(isinstance(results[name][k], float) for k in eval_metrics.METRICS)
    assert set(results[name]["gold_by_family"]) <= set(offline_task.FAMILIES)
  assert {k for k, v in results["base"].items() if v is not None} == {"pretrain_loss",
                                                                      "probe_score"}
  assert set(results["best_of_n"]) == {"bo2_rm", "bo2_gold", "bo4_rm", "bo4_gold"}
  for name, row in results["best_of_n"].items():
    assert set(row) == ROW_KEYS
    assert row["pretrain_loss"] is None and row["probe_score"] is None
    assert all(isinstance(row[k], float) for k in eval_metrics.METRICS[:-2])
  rm = results["rm"]
  assert (rm["heldout_accuracy"], rm["gold_accuracy"]) == (0.7, 0.72)
  assert set(rm) == {"heldout_accuracy", "gold_accuracy", "comparisons", "overall", "by_family",
                     "by_gold_gap"}
  assert rm["overall"]["records"] > 0 and rm["overall"]["pairs"] > 0
  assert sum(b["pairs"] for b in rm["by_family"].values()) == rm["overall"]["pairs"]
  assert sum(b["pairs"] for b in rm["by_gold_gap"].values()) == rm["overall"]["pairs"]
  assert sum(b["gold_pairs"] for b in rm["by_gold_gap"].values()) == rm["overall"]["gold_pairs"]
  meta = results["meta"]
  assert meta["prompts"] == 32 and meta["samples_per_prompt"] == 2 and meta["seed"] == 0
  assert meta["temperature"] == 1.0 and meta["seconds"] > 0 and meta["pretrain_batches"] == 2
  assert meta["probe_prompts"] == 16 and meta["best_of"] == [2, 4]
  assert meta["best_of_candidates"] == 4 and meta["plot"] == eval_results.PLOT
  assert meta["best_of_n"]["bo2_rm"]["picks_per_prompt"] == 2
  assert meta["best_of_n"]["bo4_gold"]["picks_per_prompt"] == 1
  assert meta["machine"]["device_count"] == jax.device_count()
  assert set(meta["policies"]) == {"base", *policies}
  dpo = meta["policies"]["dpo"]
  assert set(dpo) == {"path", "mean_response_tokens", "no_eos_fraction", "win_rate_stderr",
                      "win_rate_interval95", "beta", "implicit_reward_accuracy",
                      "implicit_reward_gold_accuracy"}
  assert (dpo["beta"], dpo["implicit_reward_accuracy"], dpo["implicit_reward_gold_accuracy"]) == (
      0.1, 0.66, 0.61)
  assert "implicit_reward_accuracy" not in meta["policies"]["ppo"]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  assert "| policy | gold win rate vs SFT" in md and "## Sample completions" in md
  assert all(f"| {n} |" in md for n in ("base", *policies, "bo2_rm", "bo4_gold"))
  assert "## Gold score by instruction family" in md and "| gold gap | pairs |" in md
  assert "![over-optimisation](plots/overoptimisation.png)" in md
  assert "## Capability probe (greedy)" in md
  assert "* **dpo**: DPO (beta 0.1)" in md and "accuracy 0.660 (against gold 0.610)" in md
  assert os.path.getsize(os.path.join(workdir, eval_results.PLOT)) > 1000
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
  assert results["ppo_ptx"]["probe_score"] == results["sft"]["probe_score"]   # greedy
  assert results["ppo"]["pretrain_loss"] != results["sft"]["pretrain_loss"]
  # Same weights, independent samples: the SFT row and the ppo_ptx row are different draws.
  assert results["ppo_ptx"]["gold_score"] != results["sft"]["gold_score"]


def test_a_better_policy_wins(run_dir):
  """ppo always starts with MARK, which the score prefers: it wins against (almost) every SFT
  sample."""
  _, _, results = run_dir
  ppo = results["ppo"]
  assert ppo["gold_win_rate_vs_sft"] > 0.9 and ppo["gold_score"] >= 1.0
  assert results["meta"]["policies"]["ppo"]["mean_response_tokens"] == 8.0   # never EOS
  assert ppo["kl_to_sft"] > 8.0           # 8 x (log 1 - log pi_SFT(MARK)), about 8 log(vocab)
  assert ppo["probe_score"] == 1.0        # the probe read ppo's own continuations
  assert results["sft"]["probe_score"] < 0.5 and results["base"]["probe_score"] < 0.5


def test_best_of_n_rows(run_dir):
  _, _, results = run_dir
  best, meta = results["best_of_n"], results["meta"]["best_of_n"]
  for n in (2, 4):
    rm, gold = best[f"bo{n}_rm"], best[f"bo{n}_gold"]
    assert rm["kl_to_sft"] == gold["kl_to_sft"] == pytest.approx(math.log(n) - (n - 1) / n)
    # The same candidate groups: the gold pick is at least as good under gold, the RM pick
    # under the RM.
    assert gold["gold_score"] >= rm["gold_score"] and rm["rm_score"] >= gold["rm_score"]
    # The best of n draws of a continuous score beats one more draw with probability n/(n+1).
    # (Every row is compared with the same baseline samples, so one baseline draw shifts them all
    # alike: SFT against it is 0.56 here; hence the margin.)
    se = meta[f"bo{n}_gold"]["win_rate_stderr"]
    assert abs(gold["gold_win_rate_vs_sft"] - n / (n + 1)) < 4 * se + 0.02
    # A random reward model knows nothing of the (hash) score.
    assert abs(rm["gold_win_rate_vs_sft"] - 0.5) < 4 * meta[f"bo{n}_rm"]["win_rate_stderr"] + 0.02
  assert best["bo4_rm"]["rm_score"] >= best["bo2_rm"]["rm_score"]
  assert best["bo4_gold"]["gold_score"] >= best["bo2_gold"]["gold_score"]


def test_run_evaluates_the_policies_present(run_dir, tmp_path):
  workdir, config, _ = run_dir
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.best_of, config.eval.probe_prompts = (), 8     # best-of-N off
  for name in ("ppo_ptx", "pretrain"):
    shutil.move(os.path.join(workdir, name), os.path.join(tmp_path, name))
  try:
    results = evaluate.run(config, workdir)
  finally:
    for name in ("ppo_ptx", "pretrain"):
      shutil.move(os.path.join(tmp_path, name), os.path.join(workdir, name))
  assert set(results) == {"sft", "ppo", "ppo_oracle", "dpo", "best_of_n", "rm", "meta"}
  assert results["best_of_n"] == {} and results["meta"]["best_of"] == []
  with pytest.raises(UserError, match="sft"):
    evaluate.run(config, str(tmp_path))


@pytest.mark.parametrize("field,value", [("samples_per_prompt", 0), ("temperature", 0.0),
                                         ("batch_size", 12), ("max_new_tokens", 240),
                                         ("best_of", (4, 0)), ("best_of", (2.5,)),
                                         ("best_of", (4, 4)), ("probe_new_tokens", 0),
                                         ("rm_seq_len", 1000)])
def test_bad_eval_config_is_one_line_user_error(run_dir, field, value):
  workdir, config, _ = run_dir
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval[field] = value
  with pytest.raises(UserError, match=f"config.eval.{field}") as e:
    evaluate.run(config, workdir)
  assert "\n" not in str(e.value)
