"""The arithmetic of the evaluation: win rate, Monte-Carlo KL, best-of-N and its KL, style metrics.

Pure numpy functions of scores and analyses (no model, no I/O), each checked against a brute-force
reference in tests/test_evaluate.py.

The win rate's standard error is over prompts (the samples of one prompt are not independent):
se = std_p(m_p) / sqrt(P), m_p = the mean outcome of prompt p over all its (sample, baseline)
pairs.

Best-of-N: the N_max candidates of a prompt are cut into N_max // N DISJOINT groups of N
(consecutive columns; N_max // N independent best-of-N draws per prompt, a single prefix when
N = N_max); `best_of_n` picks the best of each group, ties to the first. Their KL to the base
policy is the analytic KL of best-of-N, log N - (N - 1)/N (Stiennon et al. 2020, Gao et al. 2022;
exact for a continuous score, an upper bound when scores tie), not a sample estimate.
"""
import math

import numpy as np

from rlhf_jax.data import offline_task

METRICS = ("gold_win_rate_vs_sft", "gold_score", "content_score", "rm_score", "kl_to_sft",
           "filler_rate", "hallucination_rate", "pretrain_loss", "probe_score")


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
  """`gold_labeler.analyze` dicts (row-major, `shape` of them) -> arrays of that shape: family
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


def family_order(families):
  """The distinct `families` in table order: the offline task's FAMILIES first, then the others
  sorted."""
  present = set(families)
  known = offline_task.FAMILIES
  return [f for f in known if f in present] + sorted(present - set(known))


def style_metrics(arrays, gold=None):
  """Style vs correctness of a set of responses (`analysis_arrays`, any shape):

    content_score       mean content score (gold with filler words removed)
    filler_rate         fraction of responses with a filler word
    hallucination_rate  fraction of the sort/reverse/count responses with >= 1 hallucinated word
                        (None when there is none of them)
    gold_by_family      {family: mean gold score} over the families present (`family_order`);
                        `gold` (same shape) replaces the analysis' own gold scores when given
  """
  gold = arrays["gold"] if gold is None else np.asarray(gold, np.float64)
  family = arrays["family"].reshape(-1)
  gold = gold.reshape(-1)
  hal = arrays["hallucinated"].reshape(-1)
  listed = ~np.isnan(hal)
  order = family_order(family)
  return {"content_score": float(arrays["content"].mean()),
          "filler_rate": float((arrays["filler"] >= 1).mean()),
          "hallucination_rate": float((hal[listed] >= 1).mean()) if listed.any() else None,
          "gold_by_family": {f: float(gold[family == f].mean()) for f in order}}


def results_row(gold=None, baseline=None, analysis=None, rm_score=None, kl=None,
                pretrain_loss=None, probe=None):
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


def reference_free(rm_score, baseline_rm=None, judge=None, baseline_judge=None):
  """(row fields, extras) of the metrics that need no gold labeler (real data), from (P, A)
  samples against (P, B) SFT baseline samples of the same prompts (`win_rate`):

    rm_win_rate_vs_sft     win rate under the trained reward model (when baseline_rm is given)
    judge_score            mean score of an external judge reward model (when judge is given)
    judge_win_rate_vs_sft  win rate under that judge (when baseline_judge is given)

  Each win rate comes with `<name>_stderr` and `<name>_interval95` in the extras.
  """
  row, extra = {}, {}
  for name, scores, baseline in (("rm", rm_score, baseline_rm), ("judge", judge, baseline_judge)):
    if scores is None or baseline is None:
      continue
    rate, se = win_rate(scores, baseline)
    row[f"{name}_win_rate_vs_sft"] = rate
    extra.update({f"{name}_win_rate_stderr": se,
                  f"{name}_win_rate_interval95": interval95(rate, se)})
  if judge is not None:
    row["judge_score"] = float(np.mean(judge))
  return row, extra
