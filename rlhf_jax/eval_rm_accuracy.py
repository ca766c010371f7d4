"""The reward model in the evaluation: its own held-out accuracy, and its accuracy tables on the
collect stage's held-out comparisons of SFT samples (overall, by family, by gold-score gap).

Each pair i < j of valid responses of a comparison record is compared three ways: the RM against
the labels (pairs with different ranks), the RM against the gold labeler (pairs with different gold
scores), and the labels against gold (the simulated labeler's agreement, the RM's noise ceiling).
"""
import json
import math
import os

import numpy as np

from rlhf_jax import eval_metrics
from rlhf_jax import rollout
from rlhf_jax.data import loaders, offline_task
from rlhf_jax.errors import UserError
from rlhf_jax.train import rm
from rlhf_jax.train import stage_io

# Gold-score gaps |gold_i - gold_j| of the RM accuracy table: "0", then (lo, hi] intervals.
GAP_EDGES = (0.0, 0.1, 0.25, 0.5, math.inf)


def gap_bucket_names():
  """The names of the gold-gap buckets: "0", then "(lo, hi]" per GAP_EDGES interval, "> lo"."""
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
  for f in eval_metrics.family_order(fam):
    sel = fam == f
    by_family[f] = _accuracy_entry(s2[sel], r2[sel], g2[sel])
  names = gap_bucket_names()
  by_gap = {names[0]: _accuracy_entry(s2[gap == 0], r2[gap == 0], g2[gap == 0])}
  for name, lo, hi in zip(names[1:], GAP_EDGES[:-1], GAP_EDGES[1:]):
    sel = (gap > lo) & (gap <= hi)
    by_gap[name] = _accuracy_entry(s2[sel], r2[sel], g2[sel])
  return {"overall": _accuracy_entry(s2, r2, g2), "by_family": by_family, "by_gold_gap": by_gap}



def stage_accuracy(rm_path):
  """The RM's held-out accuracy (and against gold) from its own training run's stage meta."""
  meta_path = os.path.join(rm_path, "rlhf_jax_stage.json")
  final = {}
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      final = json.load(f).get("final_eval") or {}
  return {"heldout_accuracy": final.get("accuracy"), "gold_accuracy": final.get("gold_accuracy")}


def comparison_seq_len(config, max_len):
  """The sequence length of the held-out comparison rows: config.eval.rm_seq_len, else the rm
  section's seq_len, else prompt_len + max_new_tokens; at most the RM's max_len."""
  e = config.eval
  seq_len = e.rm_seq_len
  if not seq_len and "rm" in config and "seq_len" in config.rm:
    seq_len = int(config.rm.seq_len)
  seq_len = seq_len or e.prompt_len + e.max_new_tokens
  if seq_len > max_len:
    raise UserError(f"config.eval.rm_seq_len: the held-out comparisons would be read at {seq_len} "
                    f"tokens, more than the reward model's max_len {max_len}")
  return seq_len


def comparison_tables(config, comparisons_dir, tok, rm_cfg, rm_params, mesh):
  """`rm_accuracy_tables` of the reward model on the held-out comparisons in `comparisons_dir`
  (a TFDS dir, the collect stage's), batched like `rm.RmEval`; adds the number of records."""
  e = config.eval
  source = stage_io.load_split(comparisons_dir, "comparisons", config.data.eval_split,
                               "eval_split")
  k_max = max(len(source[i]["responses"]) for i in range(len(source)))
  seq_len = comparison_seq_len(config, rm_cfg.max_len)
  rewards_fn = rollout.JittedOnMesh(lambda p, b: rm.response_rewards(rm_cfg, p, b), mesh)
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
    families += [offline_task.parse_prompt(loaders.text_of(source[int(i)]["prompt"]))[0]
                 for i in batch["index"][rows]]
  out = rm_accuracy_tables(np.concatenate(rewards), np.concatenate(ranks),
                           np.concatenate(valid), np.concatenate(gold), families)
  out["overall"]["records"] = len(source)
  return out


def section(config, rm_path, comparisons_dir, tok, rm_cfg, rm_params, mesh):
  """results['rm']: `stage_accuracy` and, when `comparisons_dir` exists (offline task), the
  `comparison_tables` on it (else None)."""
  out = stage_accuracy(rm_path)
  tables = None
  if config.data.source == "offline" and os.path.isdir(comparisons_dir):
    tables = comparison_tables(config, comparisons_dir, tok, rm_cfg, rm_params, mesh)
  out.update(comparisons=os.path.abspath(comparisons_dir) if tables else None,
             overall=tables and tables["overall"], by_family=tables and tables["by_family"],
             by_gold_gap=tables and tables["by_gold_gap"])
  return out
