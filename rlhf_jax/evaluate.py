"""Evaluation of the policies (SFT, PPO, PPO-ptx, the gold-reward oracle) on held-out prompts, with
best-of-N baselines, the reward model's accuracy and the alignment tax: what InstructGPT reports,
plus the diagnostics that show why RLHF works (or does not) on the offline task.

For each policy, `samples_per_prompt` responses to each held-out prompt (the validation `prompts`
split) are sampled at `temperature` (default 1: the policy's own distribution), and:

  gold_win_rate_vs_sft  each policy sample against EVERY one of the `samples_per_prompt` SFT
                        baseline samples of the same prompt under the gold labeler (win 1, tie
                        0.5, loss 0), averaged. The baseline samples are drawn once, independently
                        of every policy's own samples (and of the best-of-N candidates), so SFT
                        against itself is computed (about 0.5), not assumed.
  gold_score            mean gold score of the samples.
  content_score         mean gold score with the filler words removed (correctness alone;
                        `offline_task.analyze`), so a gain in gold_score can be split into style
                        (dropping the filler) and substance.
  rm_score              mean reward-model score (`<workdir>/rm/model`, read at the last token).
  kl_to_sft             mean over samples of sum_t (log pi(y_t) - log pi_SFT(y_t)) over the response
                        tokens (EOS included), log-probs at the sampling temperature from a forward
                        pass of both models: the usual Monte-Carlo estimate of KL(pi || pi_SFT).
  filler_rate           fraction of responses with a filler word.
  hallucination_rate    fraction of sort/reverse/count responses with >= 1 word not in the prompt's
                        list (the paper's closed-domain hallucination rate).
  gold_by_family        mean gold score per instruction family (sort, reverse, count, add).
  pretrain_loss         mean token NLL on the held-out pretraining text (`ptx` validation split,
                        the first `pretrain_batches` packed batches): the alignment tax.
  probe_score           the capability probe (offline task): greedy continuation of the probe
                        prompts "the list fig pear kiwi has" (`probe_new_tokens` tokens), scored by
                        `offline_task.probe_score`; only the pretraining text teaches this, so a
                        drop from the base model is what RLHF costs and what the ptx term restores.

The base model (`<workdir>/pretrain/model` when it exists, row `base`) gets only pretrain_loss and
probe_score: it is no policy (it does not follow the prompt format).

Best-of-N (`best_of`, e.g. (4, 16)): for each prompt, N_max = max(best_of) SFT candidates are
sampled once (their own rng stream) and scored by the reward model and the gold labeler. The N_max
candidates are cut into N_max // N DISJOINT groups of N (consecutive columns; N_max // N
independent best-of-N draws per prompt, a single prefix when N = N_max); `best_of_n` picks the
best of each group by the RM (`bo{N}_rm`) or by the gold labeler (`bo{N}_gold`, the ceiling of
reranking), ties to the first. Each pick is compared with every SFT baseline sample of its prompt
like a policy sample; the standard error is over prompts as below, so the dependence between the
picks of one prompt (they share the baseline samples) is accounted for. Their KL to SFT is the
analytic KL of best-of-N, log N - (N - 1)/N (Stiennon et al. 2020, Gao et al. 2022; exact for a
continuous score, an upper bound when scores tie), not a sample estimate.

The win rate's standard error is over prompts (the samples of one prompt are not independent):
se = std_p(m_p) / sqrt(P), m_p = the mean outcome of prompt p over all its (sample, baseline)
pairs.

`rm`: the reward model's held-out accuracy read from its stage meta and, when the collect stage's
comparisons exist (`<workdir>/collect/tfds`, split `data.eval_split`), its pairwise accuracy on
those held-out comparisons of SFT samples against the labels and against the gold labeler,
overall, by instruction family and by the gold-score gap |gold_i - gold_j| of the pair (with the
labels' own agreement with gold, the noise ceiling, and the pair counts).

Results go to `<workdir>/results.json` and `<workdir>/results.md` (the tables, how to read them,
and a few completions per policy for the same prompts), both written atomically, and
`<workdir>/plots/overoptimisation.png` (gold and RM score against sqrt(KL): the PPO runs over
their iterations, best-of-N, the final policies; Gao et al. 2022, figure 1).

Every jitted function has fixed shapes (prompt batches are padded; best-of-N candidates are drawn
`samples_per_prompt` at a time with the same sampler), so the sampler and each scoring forward
compile once for all policies of the same shape.
"""
import json
import math
import os
import platform
import time
import zlib

import jax
import ml_collections
import numpy as np

from rlhf_jax import collect
from rlhf_jax import losses
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.train import rm
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import forward, jit_eval_step

POLICIES = ("sft", "ppo", "ppo_ptx", "ppo_oracle")
BASE = "base"                # the pretrained base model: probe and pretrain loss only
METRICS = ("gold_win_rate_vs_sft", "gold_score", "content_score", "rm_score", "kl_to_sft",
           "filler_rate", "hallucination_rate", "pretrain_loss", "probe_score")
BASELINE = "sft_baseline"    # the rng stream of the SFT samples every policy is compared with
CANDIDATES = "best_of_n"     # the rng stream of the best-of-N candidates
FAMILIES = ("sort", "reverse", "count", "add")
# Gold-score gaps |gold_i - gold_j| of the RM accuracy table: "0", then (lo, hi] intervals.
GAP_EDGES = (0.0, 0.1, 0.25, 0.5, math.inf)
PPO_RUNS = ("ppo", "ppo_ptx", "ppo_oracle")
PLOT = os.path.join("plots", "overoptimisation.png")


def default_config(preset="tiny"):
  """The `eval` ConfigDict (embedded as `config.eval` next to the usual `data` and `mesh`)."""
  c = ml_collections.ConfigDict()
  c.num_prompts = 0            # held-out prompts (data.eval_split of `prompts`); 0 = all (offline: 400)
  c.samples_per_prompt = 4     # responses per prompt and policy
  c.temperature = 1.0          # sampling temperature (1 = the policies' own distribution)
  c.max_new_tokens = 256
  c.prompt_len = 256           # prompts left-padded (or cut on the left) to this many tokens
  c.batch_size = 32            # prompts per sampler call (x samples_per_prompt rows)
  c.seed = 0
  c.rm_path = "auto"           # the reward model; 'auto' = <workdir>/rm/model
  c.pretrain_batches = 8       # packed batches of held-out pretraining text (0 = no pretrain_loss)
  c.pretrain_batch_size = 16
  c.pretrain_seq_len = 1024
  c.num_examples = 3           # prompts whose completions results.md shows
  # Best-of-N baselines: max(best_of) SFT candidates per prompt, reranked by the RM and by gold.
  c.best_of = (4, 16)          # () = off
  c.probe_prompts = 0          # capability-probe prompts (offline task); 0 = all
  c.probe_new_tokens = 4       # greedy tokens decoded per probe prompt
  # Sequence length of the held-out comparisons (RM accuracy tables); 0 = config.rm.seq_len when
  # the config has an `rm` section (the pipeline's), else prompt_len + max_new_tokens.
  c.rm_seq_len = 0
  if preset == "tiny":
    c.max_new_tokens, c.prompt_len, c.batch_size = 24, 24, 40   # max_new_tokens: PPO response_len
    c.pretrain_seq_len = 128
  elif preset == "smollm2":
    c.max_new_tokens, c.prompt_len, c.batch_size = 32, 48, 32
    c.pretrain_seq_len = 256
  return c


# ----------------------------------------------------------------------------- the arithmetic

def win_outcomes(scores, baseline):
  """Elementwise outcome of `scores` against `baseline` (broadcast): 1 if greater, 0.5 if equal,
  0 if less."""
  scores, baseline = np.asarray(scores, np.float64), np.asarray(baseline, np.float64)
  return (scores > baseline) + 0.5 * (scores == baseline)


def win_rate(scores, baseline):
  """(rate, standard error) of (P, A) scores against (P, B) baseline scores, every one of the A
  samples of prompt p against every one of its B baseline samples:

    m_p  = mean_{a, b} outcome(scores[p, a], baseline[p, b])
    rate = mean_p m_p
    se   = std_p(m_p, ddof=1) / sqrt(P)   (0 when P = 1)
  """
  scores, baseline = np.asarray(scores), np.asarray(baseline)
  p = scores.shape[0]
  outcome = win_outcomes(scores.reshape(p, -1, 1), baseline.reshape(p, 1, -1))
  per_prompt = outcome.reshape(p, -1).mean(axis=1)
  se = float(per_prompt.std(ddof=1) / np.sqrt(p)) if p > 1 else 0.0
  return float(per_prompt.mean()), se


def interval95(rate, se):
  """Normal 95% interval rate -+ 1.96 se, clipped to [0, 1]."""
  return [max(0.0, rate - 1.96 * se), min(1.0, rate + 1.96 * se)]


def sequence_kl(logp, logp_ref, mask):
  """Per sample: sum_t mask[t] * (logp[t] - logp_ref[t]), (N, T) -> (N,) in float64."""
  diff = np.asarray(logp, np.float64) - np.asarray(logp_ref, np.float64)
  return (diff * np.asarray(mask, np.float64)).sum(axis=1)


def best_of_n(scores, n):
  """The best of each group of `n` candidates: scores (P, M) -> (P, M // n) column indices.

  Group g of prompt p is columns g*n .. g*n + n - 1 (the M % n last columns are unused); its pick
  is the column of the highest score, the first of them on a tie. With M = n this is the best of
  the n candidates, (P, 1).
  """
  scores = np.asarray(scores)
  if scores.ndim != 2 or not 1 <= n <= scores.shape[1]:
    raise ValueError(f"best_of_n: need scores (P, M) with 1 <= n <= M, got {scores.shape} and "
                     f"n = {n}")
  groups = scores.shape[1] // n
  blocks = scores[:, :groups * n].reshape(scores.shape[0], groups, n)
  return np.argmax(blocks, axis=2) + n * np.arange(groups)[None, :]


def best_of_n_kl(n):
  """KL(best-of-n || base) = log n - (n - 1) / n in nats (continuous score, no ties)."""
  return math.log(n) - (n - 1) / n


def analysis_arrays(analyses, shape):
  """`offline_task.analyze` dicts (row-major, `shape` of them) -> arrays of that shape: family
  (object), gold, content, filler (float), hallucinated (float; NaN where it is None: add)."""
  get = lambda key: [a[key] for a in analyses]
  hal = [np.nan if h is None else float(h) for h in get("hallucinated")]
  return {"family": np.asarray(get("family"), dtype=object).reshape(shape),
          "gold": np.asarray(get("gold"), np.float64).reshape(shape),
          "content": np.asarray(get("content"), np.float64).reshape(shape),
          "filler": np.asarray(get("filler"), np.float64).reshape(shape),
          "hallucinated": np.asarray(hal, np.float64).reshape(shape)}


def take_columns(arrays, index):
  """Each (P, M) array of `arrays` at the (P, G) column `index` -> (P, G) arrays."""
  return {k: np.take_along_axis(v, index, axis=1) for k, v in arrays.items()}


def style_metrics(arrays, gold=None):
  """Style vs correctness of a set of responses (`analysis_arrays`, any shape):

    content_score       mean content score (gold with filler words removed)
    filler_rate         fraction of responses with a filler word
    hallucination_rate  fraction of the sort/reverse/count responses with >= 1 hallucinated word
                        (None when there is none of them)
    gold_by_family      {family: mean gold score} over the families present, in FAMILIES order;
                        `gold` (same shape) replaces the analysis' own gold scores when given
  """
  gold = arrays["gold"] if gold is None else np.asarray(gold, np.float64)
  family = arrays["family"].reshape(-1)
  gold = gold.reshape(-1)
  hal = arrays["hallucinated"].reshape(-1)
  listed = ~np.isnan(hal)
  order = [f for f in FAMILIES if f in set(family)] + sorted(set(family) - set(FAMILIES))
  return {"content_score": float(arrays["content"].mean()),
          "filler_rate": float((arrays["filler"] >= 1).mean()),
          "hallucination_rate": float((hal[listed] >= 1).mean()) if listed.any() else None,
          "gold_by_family": {f: float(gold[family == f].mean()) for f in order}}


def gap_bucket_names():
  names = ["0"]
  for lo, hi in zip(GAP_EDGES[:-1], GAP_EDGES[1:]):
    names.append(f"> {lo:g}" if math.isinf(hi) else f"({lo:g}, {hi:g}]")
  return names


def _accuracy_entry(s2, r2, g2):
  """Accuracies of one set of pairs (M, 2): RM vs labels, RM vs gold, labels vs gold."""
  ones = np.ones(s2.shape)
  out = {}
  for name, count, (score, rank) in (("accuracy", "pairs", (s2, r2)),
                                     ("gold_accuracy", "gold_pairs", (s2, -g2)),
                                     ("label_gold_accuracy", None, (-r2, -g2))):
    correct, pairs = rm.pair_accuracy(score, rank, ones) if len(s2) else (0.0, 0.0)
    out[name] = correct / pairs if pairs else None
    if count:
      out[count] = int(pairs)
  return out


def rm_accuracy_tables(rewards, ranks, valid, gold, families):
  """The reward model's pairwise accuracy on comparisons, overall, by family and by gold gap.

  rewards, ranks (lower = preferred, equal = no preference), valid (1/0), gold: (N, K_max);
  families: N family names. Every pair i < j of valid responses of a record is one (2,)-row fed
  to `rm.pair_accuracy`: against the labels (pairs with different ranks), against gold (pairs
  with different gold scores), and the labels against gold (the labeler's agreement, the noise
  ceiling of the RM). Gap bucket "0" holds the pairs of equal gold score (no gold comparison).
  Each entry: {pairs, accuracy, gold_pairs, gold_accuracy, label_gold_accuracy}.
  """
  rewards, ranks = np.asarray(rewards, np.float64), np.asarray(ranks, np.float64)
  gold, valid = np.asarray(gold, np.float64), np.asarray(valid) > 0
  i, j = np.triu_indices(rewards.shape[1], k=1)
  both = valid[:, i] & valid[:, j]
  row, col = np.nonzero(both)
  a, b = i[col], j[col]
  s2 = np.stack([rewards[row, a], rewards[row, b]], 1)
  r2 = np.stack([ranks[row, a], ranks[row, b]], 1)
  g2 = np.stack([gold[row, a], gold[row, b]], 1)
  fam = np.asarray(families, dtype=object)[row]
  gap = np.abs(g2[:, 0] - g2[:, 1])
  by_family = {}
  for f in [f for f in FAMILIES if f in set(fam)] + sorted(set(fam) - set(FAMILIES)):
    sel = fam == f
    by_family[f] = _accuracy_entry(s2[sel], r2[sel], g2[sel])
  names = gap_bucket_names()
  by_gap = {names[0]: _accuracy_entry(s2[gap == 0], r2[gap == 0], g2[gap == 0])}
  for name, lo, hi in zip(names[1:], GAP_EDGES[:-1], GAP_EDGES[1:]):
    sel = (gap > lo) & (gap <= hi)
    by_gap[name] = _accuracy_entry(s2[sel], r2[sel], g2[sel])
  return {"overall": _accuracy_entry(s2, r2, g2), "by_family": by_family, "by_gold_gap": by_gap}


# ----------------------------------------------------------------------------- jitted pieces

def make_logprob_fn(cfg, num_new, temperature):
  """(params, batch) -> (B, num_new) log-probs of the last `num_new` tokens of `batch['tokens']`
  (prompt ++ response), each predicted from the position before it."""

  def fn(params, batch):
    logits = forward(cfg, "lm", params, batch)
    width = batch["tokens"].shape[1]
    return losses.token_logprobs(logits[:, width - num_new - 1:width - 1],
                                 batch["tokens"][:, width - num_new:], temperature)[0]
  return fn


def make_reward_fn(cfg):
  """(params, batch) -> (B,) scalar head at `batch['last_index']`."""

  def fn(params, batch):
    values = forward(cfg, "scalar", params,
                     {"tokens": batch["tokens"], "segment_ids": batch["segment_ids"]})
    return losses.gather_last(values, batch["last_index"])
  return fn


def make_lm_loss_fn(cfg):

  def fn(params, batch):
    logits = forward(cfg, "lm", params, batch)
    return losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])
  return fn


def sequences(prompt_tokens, prompt_seg, out, num_samples):
  """Prompt ++ response rows for scoring: tokens, segment_ids (1 on prompt and response tokens up
  to EOS), last_index (the last response token, or the last prompt token if none)."""
  tokens = np.concatenate([np.repeat(prompt_tokens, num_samples, 0), out["tokens"]], axis=1)
  seg = np.concatenate([np.repeat(prompt_seg, num_samples, 0),
                        (out["mask"] > 0).astype(np.int32)], axis=1)
  last = prompt_tokens.shape[1] + out["lengths"].astype(np.int32) - 1
  return {"tokens": tokens.astype(np.int32), "segment_ids": seg, "last_index": last}


class _Jitted:
  """A jitted (params, batch) function compiled on its first call, sharded over the batch."""

  def __init__(self, fn, mesh):
    self.fn, self.mesh, self.step = fn, mesh, None

  def __call__(self, params, host_batch):
    size = len(next(iter(host_batch.values())))
    rows = sharding.process_batch_rows(self.mesh, size)
    local = {k: v[rows] for k, v in host_batch.items()}
    if self.step is None:
      self.step = jit_eval_step(self.fn, jax.tree.map(lambda x: x.sharding, params),
                                local, self.mesh)
    with sharding.activate(self.mesh):
      out = self.step(params, sharding.global_batch(local, self.mesh, size))
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)


# ----------------------------------------------------------------------------- evaluation

def validate(config):
  """One-line UserError for the first bad field of `config.eval`."""
  if "eval" not in config:
    raise UserError("config.eval is missing (expected the ConfigDict of "
                    "rlhf_jax.evaluate.default_config)")
  e = config.eval
  for field, minimum in (("num_prompts", 0), ("samples_per_prompt", 1), ("max_new_tokens", 1),
                         ("prompt_len", 1), ("batch_size", 1), ("seed", 0),
                         ("pretrain_batches", 0), ("pretrain_batch_size", 1),
                         ("pretrain_seq_len", 2), ("num_examples", 0), ("probe_prompts", 0),
                         ("probe_new_tokens", 1), ("rm_seq_len", 0)):
    if field not in e:
      raise UserError(f"config.eval.{field} is missing (see rlhf_jax.evaluate.default_config)")
    value = e[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise UserError(f"config.eval.{field} must be an integer >= {minimum}, got {value!r}")
  if not (isinstance(e.temperature, (int, float)) and e.temperature > 0):
    raise UserError(f"config.eval.temperature must be a number > 0, got {e.temperature!r}")
  if "best_of" not in e:
    raise UserError("config.eval.best_of is missing (see rlhf_jax.evaluate.default_config)")
  best_of = e.best_of
  if (not isinstance(best_of, (tuple, list))
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in best_of)
      or len(set(best_of)) != len(best_of)):
    raise UserError(f"config.eval.best_of must be a list of distinct integers >= 1 (N of the "
                    f"best-of-N baselines; () = off), got {best_of!r}")


def _load_lm(path, where, reference_cfg=None):
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f"{where}: {path} does not exist")
  model = load_model(path)
  if model.head != "lm":
    raise UserError(f"{where}: {path} holds a model with a {model.head!r} head; expected a policy "
                    "(language model)")
  if reference_cfg is not None:
    differ = stage_io.shape_fields_differ(model.cfg, reference_cfg)
    if differ:
      raise UserError(f"{where}: {path} has another shape than the SFT model ({'; '.join(differ)})")
  return model


def _rm_meta(rm_path):
  meta_path = os.path.join(rm_path, "rlhf_jax_stage.json")
  final = {}
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      final = json.load(f).get("final_eval") or {}
  return {"heldout_accuracy": final.get("accuracy"), "gold_accuracy": final.get("gold_accuracy")}


def _stream(key, name):
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class _Sampled:
  """Samples of one policy (or the best-of-N candidates): texts [P][S], gold (P, S) or None,
  rm (P, S), kl (N,), tokens, ended, analysis (`analysis_arrays`) or None."""

  def __init__(self):
    self.texts, self.gold, self.rm, self.kl, self.tokens, self.ended = [], None, [], [], [], []
    self.analysis = None


def _pretrain_batches(config, tfds_dir, tok, mesh):
  """The first `pretrain_batches` packed held-out pretraining batches, or None when the data has
  no pretraining text."""
  from rlhf_jax.data import builders, loaders  # pylint: disable=g-import-not-at-top
  e = config.eval
  if not e.pretrain_batches or not builders.RlhfPtx(data_dir=tfds_dir).is_prepared():
    return None
  collect.batch_size_check(e.pretrain_batch_size, mesh, "eval.pretrain_batch_size")
  source = stage_io.load_split(tfds_dir, "ptx", config.data.eval_split, "eval_split")
  out = []
  for batch in loaders.ptx_loader(source, tok, batch_size=e.pretrain_batch_size,
                                  seq_len=e.pretrain_seq_len, num_epochs=1, shuffle=False,
                                  shard=(0, 1)):
    out.append({k: batch[k] for k in ("tokens", "segment_ids", "positions", "loss_mask")})
    if len(out) == e.pretrain_batches:
      break
  if not out:
    raise UserError(f"config.eval.pretrain_batch_size: the held-out pretraining text does not fill "
                    f"one batch of {e.pretrain_batch_size} x {e.pretrain_seq_len} tokens")
  return out


def _comparison_seq_len(config, max_len):
  e = config.eval
  seq_len = e.rm_seq_len
  if not seq_len and "rm" in config and "seq_len" in config.rm:
    seq_len = int(config.rm.seq_len)
  seq_len = seq_len or e.prompt_len + e.max_new_tokens
  if seq_len > max_len:
    raise UserError(f"config.eval.rm_seq_len: the held-out comparisons would be read at {seq_len} "
                    f"tokens, more than the reward model's max_len {max_len}")
  return seq_len


def _rm_comparisons(config, comparisons_dir, tok, rm_cfg, rm_params, mesh):
  """`rm_accuracy_tables` of the reward model on the held-out comparisons in `comparisons_dir`
  (a TFDS dir, the collect stage's), batched like `rm.RmEval`; adds `comparisons` (the dir)."""
  from rlhf_jax.data import loaders, offline_task  # pylint: disable=g-import-not-at-top
  e = config.eval
  source = stage_io.load_split(comparisons_dir, "comparisons", config.data.eval_split,
                               "eval_split")
  k_max = max(len(source[i]["responses"]) for i in range(len(source)))
  seq_len = _comparison_seq_len(config, rm_cfg.max_len)
  rewards_fn = _Jitted(lambda p, b: rm.response_rewards(rm_cfg, p, b), mesh)
  keys = ("tokens", "segment_ids", "positions", "last_index")
  rewards, ranks, valid, gold, families = [], [], [], [], []
  loader = loaders.comparison_loader(source, tok, batch_size=e.batch_size, seq_len=seq_len,
                                     k_max=k_max, num_epochs=1, shuffle=False,
                                     drop_remainder=False, shard=(0, 1))
  for batch in loader:
    rows = batch["index"] >= 0
    r = rewards_fn(rm_params, {k: batch[k] for k in keys})
    rewards.append(r[rows])
    ranks.append(batch["ranks"][rows])
    valid.append(batch["response_valid"][rows])
    gold.append(rm.gold_matrix(source, batch["index"][rows], k_max))
    families += [offline_task.parse_prompt(collect.text_of(source[int(i)]["prompt"]))[0]
                 for i in batch["index"][rows]]
  out = rm_accuracy_tables(np.concatenate(rewards), np.concatenate(ranks),
                           np.concatenate(valid), np.concatenate(gold), families)
  out["overall"]["records"] = len(source)
  return out


def _row(gold=None, baseline=None, analysis=None, rm_score=None, kl=None, pretrain_loss=None,
         probe=None):
  """(results row, win-rate extras) from one set of samples; None where a metric does not apply."""
  row, extra = dict.fromkeys(METRICS), {}
  if gold is not None:
    rate, se = win_rate(gold, baseline)
    row["gold_win_rate_vs_sft"], row["gold_score"] = rate, float(np.mean(gold))
    extra.update(win_rate_stderr=se, win_rate_interval95=interval95(rate, se))
  row["gold_by_family"] = None
  if analysis is not None:
    style = style_metrics(analysis, gold)
    row.update(style)
  row["rm_score"] = None if rm_score is None else float(np.mean(rm_score))
  row["kl_to_sft"], row["pretrain_loss"], row["probe_score"] = kl, pretrain_loss, probe
  return row, extra


def evaluate(config, workdir, policies, score_fn=None, base_path=None, analyze_fn=None):
  """Evaluates `policies` ({name: model dir}, 'sft' required) and writes results.json/results.md
  and plots/overoptimisation.png in `workdir`; returns the results dict (see the module doc).

  `score_fn(prompt, response)` is the gold labeler: default the offline task's `gold_score` when
  `config.data.source` is 'offline', else none (the gold metrics are then None). `analyze_fn`
  (default `offline_task.analyze` on the offline task, else none) gives the style columns.
  `base_path`: the pretrained base model (row `base`: pretrain loss and capability probe only).
  The RM accuracy tables are computed when `<workdir>/collect/tfds` exists (offline task).
  """
  from rlhf_jax.data import offline_task  # pylint: disable=g-import-not-at-top
  from rlhf_jax.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  validate(config)
  e = config.eval
  if "sft" not in policies:
    raise UserError("evaluate: the policies must include 'sft' (the baseline of the win rate and "
                    "the reference of the KL)")
  names = ["sft"] + [n for n in policies if n != "sft"]
  mesh = sharding.make_mesh(config.get("mesh", {"shape": (1, -1, 1)}))
  collect.batch_size_check(e.batch_size, mesh, "eval.batch_size")
  tfds_dir, data_tok_dir = stage_io.data_paths(config, workdir)
  offline = config.data.source == "offline"
  gold_fn = score_fn or (offline_task.gold_score if offline else None)
  analyze_fn = analyze_fn or (offline_task.analyze if offline else None)

  sft = _load_lm(policies["sft"], "evaluate: sft")
  cfg = sft.cfg
  if e.prompt_len + e.max_new_tokens > cfg.max_len:
    raise UserError(f"config.eval.prompt_len + config.eval.max_new_tokens = "
                    f"{e.prompt_len + e.max_new_tokens} exceeds the model's max_len {cfg.max_len}")
  if e.prompt_len + e.probe_new_tokens > cfg.max_len:
    raise UserError(f"config.eval.prompt_len + config.eval.probe_new_tokens = "
                    f"{e.prompt_len + e.probe_new_tokens} exceeds the model's max_len "
                    f"{cfg.max_len}")
  tok, _ = stage_io.load_tokenizer_for(config, sft.tokenizer_dir, data_tok_dir, cfg)
  sft_params = collect.place_params(sft.params, cfg, "lm", mesh)
  del sft
  rm_path = os.path.join(workdir, "rm", "model") if e.rm_path == "auto" else e.rm_path
  if not os.path.exists(rm_path):
    raise UserError(f"config.eval.rm_path: no reward model at {rm_path} (run the rm stage first)")
  rm_cfg, rm_params = stage_io.load_scalar_model(rm_path, cfg, "eval.rm_path")
  rm_params = collect.place_params(rm_params, rm_cfg, "scalar", mesh)
  comparisons_dir = os.path.join(workdir, "collect", "tfds")
  if offline and os.path.isdir(comparisons_dir):
    _comparison_seq_len(config, rm_cfg.max_len)     # a bad field fails before any sampling

  records = collect.split_prompts(tfds_dir, config.data.eval_split, "eval_split", e.num_prompts)
  prompts = [r["prompt"] for r in records]
  batches = list(collect.prompt_batches(records, tok, e.batch_size, e.prompt_len))
  ptx = _pretrain_batches(config, tfds_dir, tok, mesh)
  probe_prompts = offline_task.read_probe(os.path.dirname(tfds_dir)) if offline else None
  if probe_prompts is not None and e.probe_prompts:
    probe_prompts = probe_prompts[:e.probe_prompts]
  probe_batches = None if not probe_prompts else list(collect.prompt_batches(
      [{"prompt": p} for p in probe_prompts], tok, e.batch_size, e.prompt_len))
  s = e.samples_per_prompt
  best_of = sorted(e.best_of)
  n_max = max(best_of) if best_of else 0
  chunks = -(-n_max // s)
  sc = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=float(e.temperature),
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  probe_sc = SamplingConfig(max_new_tokens=e.probe_new_tokens, greedy=True,
                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  logprob = _Jitted(make_logprob_fn(cfg, e.max_new_tokens, float(e.temperature)), mesh)
  reward = _Jitted(make_reward_fn(rm_cfg), mesh)
  lm_loss = _Jitted(make_lm_loss_fn(cfg), mesh)
  key = jax.random.key(e.seed)
  print(f"evaluate: {', '.join(names)} on {len(prompts)} held-out prompts x {s} samples "
        f"(temperature {e.temperature}), best-of-{best_of or 'N off'}, reward model {rm_path}"
        + (f", {len(probe_prompts)} probe prompts" if probe_prompts else ""), flush=True)
  models = len(names) + (base_path is not None)
  bar = collect.progress(len(batches) * (len(names) + 1 + chunks)
                         + len(probe_batches or ()) * models, "evaluate")

  def run_policy(name, params, score, num_chunks=1, kl=True):
    """Samples (and scores, when `score`) every prompt batch with the policy's own rng stream:
    `num_chunks` sampler calls of `s` samples per prompt and batch (the same compiled sampler)."""
    got, stream = _Sampled(), _stream(key, name)
    n, width = len(prompts), s * num_chunks
    texts = [[] for _ in range(n)]
    rm_scores = np.zeros((n, width))
    for b, batch in enumerate(batches):
      valid = np.repeat(batch["index"] >= 0, s)
      index = batch["index"][batch["index"] >= 0]
      for c in range(num_chunks):
        rng = jax.random.fold_in(stream, b) if num_chunks == 1 else jax.random.fold_in(
            jax.random.fold_in(stream, b), c)
        out = collect.sample_batch(params, cfg, batch, mesh, e.batch_size, rng, sc, s)
        t, ended = collect.decode_responses(tok, out["tokens"][valid], out["lengths"][valid])
        for r, i in enumerate(index):
          texts[i].extend(t[r * s:(r + 1) * s])
        got.ended.append(ended)
        got.tokens.append(out["lengths"][valid] - ended)
        if score:
          seqs = sequences(batch["tokens"], batch["segment_ids"], out, s)
          rm_scores[index, c * s:(c + 1) * s] = reward(rm_params, seqs)[valid].reshape(-1, s)
          if kl:     # a policy: the Monte-Carlo KL to SFT
            lp = logprob(params, seqs)
            lp_ref = logprob(sft_params, seqs)
            got.kl.append(sequence_kl(lp, lp_ref, out["mask"])[valid])
        bar.update(1)
    got.texts = texts
    got.rm = rm_scores
    flat = [(prompts[i], t) for i in range(n) for t in texts[i]]
    if gold_fn is not None:
      got.gold = np.asarray([gold_fn(p, t) for p, t in flat], np.float64).reshape(n, width)
    if analyze_fn is not None:
      got.analysis = analysis_arrays([analyze_fn(p, t) for p, t in flat], (n, width))
    return got

  def pretrain_loss(params):
    if ptx is None:
      return None
    total = count = 0.0
    for batch in ptx:
      loss_sum, n = lm_loss(params, batch)
      total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)

  probe_texts = {}

  def probe(name, params):
    """Mean `probe_score` of the greedy continuations of the probe prompts, or None."""
    if probe_batches is None:
      return None
    texts = [None] * len(probe_prompts)
    for batch in probe_batches:
      out = collect.sample_batch(params, cfg, batch, mesh, e.batch_size, key, probe_sc, 1)
      valid = batch["index"] >= 0
      t, _ = collect.decode_responses(tok, out["tokens"][valid], out["lengths"][valid])
      for i, text in zip(batch["index"][valid], t):
        texts[int(i)] = text
      bar.update(1)
    probe_texts[name] = texts
    return float(np.mean([offline_task.probe_score(p, t) for p, t in zip(probe_prompts, texts)]))

  results, meta_policies, samples, best_rows, meta_best = {}, {}, {}, {}, {}
  try:
    baseline = run_policy(BASELINE, sft_params, score=False)
    if base_path is not None:
      base = _load_lm(base_path, "evaluate: base", cfg)
      params = collect.place_params(base.params, cfg, "lm", mesh)
      del base
      results[BASE], _ = _row(pretrain_loss=pretrain_loss(params), probe=probe(BASE, params))
      meta_policies[BASE] = {"path": os.path.abspath(base_path)}
      del params
    for name in names:
      if name == "sft":
        params = sft_params
      else:
        model = _load_lm(policies[name], f"evaluate: {name}", cfg)
        params = collect.place_params(model.params, cfg, "lm", mesh)
        del model
      got = run_policy(name, params, score=True)
      row, extra = _row(got.gold, baseline.gold, got.analysis, got.rm,
                        float(np.concatenate(got.kl).mean()), pretrain_loss(params),
                        probe(name, params))
      extra.update(path=os.path.abspath(policies[name]),
                   mean_response_tokens=float(np.concatenate(got.tokens).mean()),
                   no_eos_fraction=float(1.0 - np.concatenate(got.ended).mean()))
      results[name], meta_policies[name], samples[name] = row, extra, got
    if best_of:
      cand = run_policy(CANDIDATES, sft_params, score=True, num_chunks=chunks, kl=False)
      cand.rm = cand.rm[:, :n_max]
      cand.gold = None if cand.gold is None else cand.gold[:, :n_max]
      if cand.analysis is not None:
        cand.analysis = {k: v[:, :n_max] for k, v in cand.analysis.items()}
      for n in best_of:
        for by, scores in (("rm", cand.rm), ("gold", cand.gold)):
          if scores is None:
            continue
          pick = best_of_n(scores, n)
          row, extra = _row(
              None if cand.gold is None else np.take_along_axis(cand.gold, pick, 1),
              baseline.gold,
              None if cand.analysis is None else take_columns(cand.analysis, pick),
              np.take_along_axis(cand.rm, pick, 1), best_of_n_kl(n))
          name = f"bo{n}_{by}"
          extra.update(n=n, selected_by=by, picks_per_prompt=int(pick.shape[1]))
          best_rows[name], meta_best[name] = row, extra
  finally:
    bar.close()
  results["best_of_n"] = best_rows
  results["rm"] = _rm_meta(rm_path)
  tables = None
  if offline and os.path.isdir(comparisons_dir):
    tables = _rm_comparisons(config, comparisons_dir, tok, rm_cfg, rm_params, mesh)
  results["rm"].update(comparisons=os.path.abspath(comparisons_dir) if tables else None,
                       overall=tables and tables["overall"],
                       by_family=tables and tables["by_family"],
                       by_gold_gap=tables and tables["by_gold_gap"])
  device = jax.devices()[0]
  results["meta"] = {
      "prompts": len(prompts), "samples_per_prompt": s, "seed": e.seed,
      "temperature": float(e.temperature), "max_new_tokens": e.max_new_tokens,
      "split": config.data.eval_split, "rm_path": os.path.abspath(rm_path),
      "gold_labeler": gold_fn is not None, "style": analyze_fn is not None,
      "pretrain_batches": 0 if ptx is None else len(ptx),
      "probe_prompts": len(probe_prompts or ()), "probe_new_tokens": e.probe_new_tokens,
      "best_of": best_of, "best_of_candidates": n_max,
      "policies": meta_policies, "best_of_n": meta_best,
      "machine": {"host": platform.node(), "platform": platform.platform(),
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "device_kind": device.device_kind, "device_count": jax.device_count(),
                  "process_count": jax.process_count()},
      "plot": PLOT,           # written by process 0 below
      "seconds": time.time() - t0,
  }
  rows = table_rows(results, names)
  examples = _examples(prompts, samples, names, e.num_examples)
  probe_examples = _probe_examples(probe_prompts, probe_texts, e.num_examples)
  if jax.process_index() == 0:
    _plot(workdir, results, names)
    results["meta"]["seconds"] = time.time() - t0
    _write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2) + "\n")
    _write_atomic(os.path.join(workdir, "results.md"),
                  format_markdown(results, rows, examples, probe_examples))
  print(table(results, rows), flush=True)
  print(f"evaluate: results in {os.path.join(workdir, 'results.json')} and results.md "
        f"({results['meta']['seconds']:.1f} s)", flush=True)
  return results


def run(config, workdir):
  """Evaluates the policies of `workdir` (sft required; ppo, ppo_ptx and ppo_oracle when their
  models exist) and the base model `<workdir>/pretrain/model` when it exists."""
  workdir = os.path.abspath(workdir)
  policies = {name: os.path.join(workdir, name, "model") for name in POLICIES
              if os.path.exists(os.path.join(workdir, name, "model"))}
  if "sft" not in policies:
    raise UserError(f"evaluate: {os.path.join(workdir, 'sft', 'model')} does not exist; run the "
                    "sft stage first")
  base = os.path.join(workdir, "pretrain", "model")
  return evaluate(config, workdir, policies, base_path=base if os.path.exists(base) else None)


# ----------------------------------------------------------------------------- reports

def _write_atomic(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _plot(workdir, results, names):
  """plots/overoptimisation.png from the PPO runs' metrics.jsonl and the evaluated rows."""
  from rlhf_jax import report  # pylint: disable=g-import-not-at-top
  runs = {n: os.path.join(workdir, n, "metrics.jsonl") for n in PPO_RUNS
          if os.path.exists(os.path.join(workdir, n, "metrics.jsonl"))}
  point = lambda r: (r["kl_to_sft"], r["gold_score"], r["rm_score"])
  best = {}
  for by in ("rm", "gold"):
    picks = [results["best_of_n"][f"bo{n}_{by}"] for n in results["meta"]["best_of"]
             if f"bo{n}_{by}" in results["best_of_n"]]
    if picks:   # N = 1 is an SFT sample: KL 0
      best[f"best-of-N by {'RM' if by == 'rm' else 'gold'}"] = (
          [(0.0, results["sft"]["gold_score"], results["sft"]["rm_score"])]
          + [point(r) for r in picks])
  report.plot_overoptimisation(runs, os.path.join(workdir, PLOT), best_of_n=best,
                               finals={n: point(results[n]) for n in names},
                               rm_free=("ppo_oracle",), smooth=8)


def _examples(prompts, samples, names, count):
  """[(prompt, [(policy, response, gold or None)])] for the first `count` prompts (sample 0)."""
  out = []
  for i in range(min(count, len(prompts))):
    rows = [(n, samples[n].texts[i][0],
             None if samples[n].gold is None else float(samples[n].gold[i, 0])) for n in names]
    out.append((prompts[i], rows))
  return out


def _probe_examples(prompts, texts, count):
  """[(probe prompt, [(model, greedy continuation)])] for the first `count` probe prompts."""
  if not prompts or not texts:
    return []
  return [(prompts[i], [(n, t[i]) for n, t in texts.items()])
          for i in range(min(count, len(prompts)))]


def _num(v, fmt="{:.3f}"):
  return "n/a" if v is None else fmt.format(v)


def table_rows(results, names):
  """[(name, row, extras)] in table order: base, the policies, then best-of-N by N (RM, gold)."""
  meta = results["meta"]
  rows = [(BASE, results[BASE], meta["policies"][BASE])] if BASE in results else []
  rows += [(n, results[n], meta["policies"][n]) for n in names]
  best = results.get("best_of_n") or {}
  for n in meta.get("best_of", ()):
    for by in ("rm", "gold"):
      name = f"bo{n}_{by}"
      if name in best:
        rows.append((name, best[name], meta["best_of_n"][name]))
  return rows


def _win(row, extra, interval=True):
  text = _num(row["gold_win_rate_vs_sft"])
  if interval and "win_rate_interval95" in extra:
    lo, hi = extra["win_rate_interval95"]
    text += f" [{lo:.3f}, {hi:.3f}]"
  return text


def table(results, rows):
  """The compact console table (one line per row of `table_rows`)."""
  lines = ["| policy | win vs SFT | gold | content | RM | KL | halluc. | probe |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r, m in rows:
    lines.append(f"| {name} | {_win(r, m, interval=False)} | {_num(r['gold_score'])} | "
                 f"{_num(r['content_score'])} | {_num(r['rm_score'])} | {_num(r['kl_to_sft'])} | "
                 f"{_num(r['hallucination_rate'])} | {_num(r['probe_score'])} |")
  return "\n".join(lines)


def full_table(rows):
  """results.md's main table."""
  lines = ["| policy | gold win rate vs SFT [95% CI] | gold score | content score | RM score "
           "| KL to SFT (nats) | filler rate | hallucination rate | pretrain loss | probe |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r, m in rows:
    kl = _num(r["kl_to_sft"]) + (" (analytic)" if "selected_by" in m else "")
    lines.append(f"| {name} | {_win(r, m)} | {_num(r['gold_score'])} | "
                 f"{_num(r['content_score'])} | {_num(r['rm_score'])} | {kl} | "
                 f"{_num(r['filler_rate'])} | {_num(r['hallucination_rate'])} | "
                 f"{_num(r['pretrain_loss'])} | {_num(r['probe_score'])} |")
  return "\n".join(lines)


def family_table(rows):
  """Gold score per instruction family, one line per row that has it."""
  rows = [(n, r) for n, r, _ in rows if r.get("gold_by_family")]
  if not rows:
    return ""
  families = [f for f in FAMILIES if any(f in r["gold_by_family"] for _, r in rows)]
  lines = ["| policy | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
  for n, r in rows:
    lines.append(f"| {n} | " + " | ".join(_num(r["gold_by_family"].get(f)) for f in families)
                 + " |")
  return "\n".join(lines)


def rm_table(entries, header):
  """One RM accuracy table: {bucket: entry of `rm_accuracy_tables`}."""
  lines = [f"| {header} | pairs | RM vs labels | gold pairs | RM vs gold | labels vs gold |",
           "|---|---|---|---|---|---|"]
  for bucket, a in entries.items():
    lines.append(f"| {bucket} | {a['pairs']} | {_num(a['accuracy'])} | {a['gold_pairs']} | "
                 f"{_num(a['gold_accuracy'])} | {_num(a['label_gold_accuracy'])} |")
  return "\n".join(lines)


def format_markdown(results, rows, examples, probe_examples=()):
  """results.md: the tables, how to read them, the RM's accuracy, the plot, sample completions."""
  meta, rm = results["meta"], results["rm"]
  best = ", ".join(str(n) for n in meta.get("best_of", ())) or "off"
  lines = ["# Evaluation", "",
           f"{meta['prompts']} held-out prompts (`{meta['split']}` split) x "
           f"{meta['samples_per_prompt']} samples per policy, temperature {meta['temperature']}, "
           f"at most {meta['max_new_tokens']} new tokens, seed {meta['seed']}; best-of-N for N = "
           f"{best} from {meta.get('best_of_candidates', 0)} SFT candidates per prompt.", "",
           full_table(rows), "",
           "How to read this:", ""]
  if meta["gold_labeler"]:
    lines.append("* **gold win rate vs SFT**: each sample against every independent SFT baseline "
                 "sample of the same prompt under the gold labeler (win 1, tie 0.5, loss 0); the "
                 "95% interval is +-1.96 standard errors over prompts. SFT itself is about 0.5.")
  else:
    lines.append("* No gold labeler for this data (only the offline task has one): no win rate.")
  lines += [
      "* **bo{N}_rm / bo{N}_gold**: the best of N SFT samples by the reward model / by the gold "
      "labeler (disjoint groups of N of the candidates, ties to the first). bo{N}_rm is what the "
      "RM can buy without training the policy; bo{N}_gold is the ceiling of reranking; PPO "
      "should beat bo{N}_rm at a similar KL. Their KL is the analytic log N - (N-1)/N.",
      "* **content score** is the gold score with filler words removed (correctness alone): a "
      "gain in gold score with no gain in content score is style (dropping the filler), not "
      "substance. **filler rate**: responses with a filler word; **hallucination rate**: "
      "sort/reverse/count responses with a word not in the prompt (the paper's closed-domain "
      "hallucinations).",
      "* **KL to SFT**: mean over samples of the summed log-ratio log pi - log pi_SFT over "
      "the response tokens (at the sampling temperature). An RM score that rises with KL while "
      "the gold score falls is over-optimisation of the reward model.",
      f"* **pretrain loss**: token NLL on {meta['pretrain_batches']} packed batches of "
      "held-out pretraining text; **probe**: the fraction of "
      f"{meta.get('probe_prompts', 0)} capability-probe prompts (\"the list fig pear kiwi has\", "
      f"greedy, {meta.get('probe_new_tokens', 0)} tokens) continued with the right count, a "
      "skill only the pretraining text teaches. Both measure the alignment tax; `base` is the "
      "pretrained model before SFT (no policy: probe and pretrain loss only).", ""]
  fam = family_table(rows)
  if fam:
    lines += ["## Gold score by instruction family", "", fam, ""]
  lines += ["## Reward model", "",
            f"{meta['rm_path']}: held-out accuracy {_num(rm['heldout_accuracy'])}, against the "
            f"gold labeler {_num(rm['gold_accuracy'])} (from its training run).", ""]
  if rm.get("by_family"):
    o = rm["overall"]
    lines += [f"On the held-out comparisons of SFT samples ({rm['comparisons']}, "
              f"{o.get('records', 0)} records): accuracy {_num(o['accuracy'])} over "
              f"{o['pairs']} labelled pairs, {_num(o['gold_accuracy'])} against gold over "
              f"{o['gold_pairs']} pairs; the labels agree with gold on "
              f"{_num(o['label_gold_accuracy'])} (the noise ceiling).", "",
              rm_table(rm["by_family"], "family"), "",
              rm_table(rm["by_gold_gap"], "gold gap"), "",
              "The gold gap of a pair is the difference of the two responses' gold scores. "
              "Accuracy that grows with the gap is a reward model that sees quality; a family "
              "near 0.5 is one it cannot judge (RL against it cannot improve that family); "
              "labels vs gold is the simulated labeler's own agreement, the ceiling.", ""]
  if meta.get("plot"):
    lines += ["## Over-optimisation", "", f"![over-optimisation]({meta['plot']})", "",
              "Gold and RM score against sqrt(KL to SFT): PPO runs over their iterations (their "
              "rollout KL and scores, running mean of 8 iterations), best-of-N by RM and by gold (N = 1 is SFT), and the "
              "evaluated policies as markers (Gao et al. 2022, figure 1).", ""]
  lines += [f"Machine: {meta['machine']['host']}, {meta['machine']['backend']} "
            f"({meta['machine']['device_kind']} x{meta['machine']['device_count']}), "
            f"{meta['seconds']:.1f} s.", ""]
  if examples:
    lines += ["## Sample completions", ""]
    for i, (prompt, ex_rows) in enumerate(examples, start=1):
      lines += [f"**Prompt {i}:** `{json.dumps(prompt)}`", ""]
      for name, response, gold in ex_rows:
        lines.append(f"* {name} (gold {_num(gold, '{:.2f}')}): `{json.dumps(response)}`")
      lines.append("")
  if probe_examples:
    lines += ["## Capability probe (greedy)", ""]
    for prompt, ex_rows in probe_examples:
      lines += [f"**`{json.dumps(prompt)}`**", ""]
      lines += [f"* {name}: `{json.dumps(text)}`" for name, text in ex_rows]
      lines.append("")
  return "\n".join(lines)
