"""What evaluate writes besides results.json: the console table, results.md and the plot.

results.md holds the tables (the policies and best-of-N, gold score by instruction family, the
reward model's accuracy), how to read them and a few completions per policy for the same prompts;
`plots/overoptimisation.png` shows gold and RM score against sqrt(KL): the PPO runs over their
iterations, best-of-N, the final policies (Gao et al. 2022, figure 1).
"""
import json
import os

from rlhf_jax import report
from rlhf_jax.data import offline_task

BASE = "base"                # the pretrained base model: probe and pretrain loss only
PPO_RUNS = ("ppo", "ppo_ptx", "ppo_oracle")
PLOT = os.path.join("plots", "overoptimisation.png")


def write_atomic(path, text):
  """`text` to `path` through a temporary file and a rename (never a half-written file)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def plot(workdir, results, names):
  """plots/overoptimisation.png from the PPO runs' metrics.jsonl and the evaluated rows."""
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


def sample_completions(prompts, samples, names, count):
  """[(prompt, [(policy, response, gold or None)])] for the first `count` prompts (sample 0)."""
  out = []
  for i in range(min(count, len(prompts))):
    rows = [(n, samples[n].texts[i][0],
             None if samples[n].gold is None else float(samples[n].gold[i, 0])) for n in names]
    out.append((prompts[i], rows))
  return out


def probe_completions(prompts, texts, count):
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


def _rate(row, extra, name, interval):
  """A win rate of the reference-free metrics (`eval_metrics.reference_free`), with its 95%
  interval when asked for."""
  text = _num(row.get(f"{name}_win_rate_vs_sft"))
  ci = extra.get(f"{name}_win_rate_interval95")
  if interval and ci:
    text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
  return text


def no_gold_table(rows, interval=True):
  """The table of data without a gold labeler (real data): win rates against SFT under the
  trained reward model and under the judge (config.eval.judge), their scores, KL, pretrain loss."""
  lines = ["| policy | RM win rate vs SFT | judge win rate vs SFT | RM score | judge score | "
           "KL to SFT (nats) | pretrain loss |", "|---|---|---|---|---|---|---|"]
  for name, r, m in rows:
    kl = _num(r["kl_to_sft"]) + (" (analytic)" if "selected_by" in m else "")
    lines.append(f"| {name} | {_rate(r, m, 'rm', interval)} | {_rate(r, m, 'judge', interval)} "
                 f"| {_num(r['rm_score'])} | {_num(r.get('judge_score'))} | {kl} | "
                 f"{_num(r['pretrain_loss'])} |")
  return "\n".join(lines)


def table(results, rows):
  """The compact console table (one line per row of `table_rows`)."""
  if not results["meta"]["gold_labeler"]:
    return no_gold_table(rows, interval=False)
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
  families = [f for f in offline_task.FAMILIES if any(f in r["gold_by_family"] for _, r in rows)]
  lines = ["| policy | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
  for n, r in rows:
    lines.append(f"| {n} | " + " | ".join(_num(r["gold_by_family"].get(f)) for f in families)
                 + " |")
  return "\n".join(lines)


def rm_table(entries, header):
  """One RM accuracy table: {bucket: entry of `eval_rm_accuracy.rm_accuracy_tables`}."""
  lines = [f"| {header} | pairs | RM vs labels | gold pairs | RM vs gold | labels vs gold |",
           "|---|---|---|---|---|---|"]
  for bucket, a in entries.items():
    lines.append(f"| {bucket} | {a['pairs']} | {_num(a['accuracy'])} | {a['gold_pairs']} | "
                 f"{_num(a['gold_accuracy'])} | {_num(a['label_gold_accuracy'])} |")
  return "\n".join(lines)


def _how_to_read(meta):
  """results.md's reading guide, one bullet per kind of column."""
  if meta["gold_labeler"]:
    lines = ["* **gold win rate vs SFT**: each sample against every independent SFT baseline "
             "sample of the same prompt under the gold labeler (win 1, tie 0.5, loss 0); the "
             "95% interval is +-1.96 standard errors over prompts. SFT itself is about 0.5."]
  else:
    lines = ["* No gold labeler for this data (only the offline task has one). **RM win rate vs "
             "SFT**: each sample against every independent SFT baseline sample of the same "
             "prompt under the trained reward model (win 1, tie 0.5, loss 0; 95% interval "
             "+-1.96 standard errors over prompts). It is what PPO optimised, so it overstates "
             "real gains; **judge win rate** is the same under config.eval.judge, a reward "
             "model that did not train the policies (n/a without one)."]
  return lines + [
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
      "pretrained model before SFT (no policy: probe and pretrain loss only)."
  ] + _dpo_note(meta) + [""]


def _dpo_note(meta):
  """The reading-guide bullet of the `dpo` row (when there is one)."""
  dpo = meta.get("policies", {}).get("dpo")
  if not dpo:
    return []
  return [f"* **dpo**: DPO (beta {_num(dpo.get('beta'), '{}')}) on the reward model's comparisons "
          "from the same SFT model, no reward model and no sampling in training; its implicit "
          "reward beta (log pi - log pi_SFT) ranks the held-out comparisons with accuracy "
          f"{_num(dpo.get('implicit_reward_accuracy'))} (against gold "
          f"{_num(dpo.get('implicit_reward_gold_accuracy'))})."]


def _reward_model_section(meta, rm):
  """results.md's reward-model section: its own accuracy and the tables on the comparisons."""
  lines = ["## Reward model", "",
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
  return lines


def _completion_sections(examples, probe_examples):
  """results.md's sample completions and greedy probe continuations."""
  lines = []
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
  return lines


def format_markdown(results, rows, examples, probe_examples=()):
  """results.md: the tables, how to read them, the RM's accuracy, the plot, sample completions."""
  meta, rm = results["meta"], results["rm"]
  best = ", ".join(str(n) for n in meta.get("best_of", ())) or "off"
  lines = ["# Evaluation", "",
           f"{meta['prompts']} held-out prompts (`{meta['split']}` split) x "
           f"{meta['samples_per_prompt']} samples per policy, temperature {meta['temperature']}, "
           f"at most {meta['max_new_tokens']} new tokens, seed {meta['seed']}; best-of-N for N = "
           f"{best} from {meta.get('best_of_candidates', 0)} SFT candidates per prompt.", "",
           full_table(rows) if meta["gold_labeler"] else no_gold_table(rows), "",
           "How to read this:", ""]
  lines += _how_to_read(meta)
  fam = family_table(rows)
  if fam:
    lines += ["## Gold score by instruction family", "", fam, ""]
  lines += _reward_model_section(meta, rm)
  if meta.get("plot"):
    lines += ["## Over-optimisation", "", f"![over-optimisation]({meta['plot']})", "",
              "Gold and RM score against sqrt(KL to SFT): PPO runs over their iterations (their "
              "rollout KL and scores, running mean of 8 iterations), best-of-N by RM and by gold "
              "(N = 1 is SFT), and the evaluated policies as markers (Gao et al. 2022, figure 1).",
              ""]
  lines += [f"Machine: {meta['machine']['host']}, {meta['machine']['backend']} "
            f"({meta['machine']['device_kind']} x{meta['machine']['device_count']}), "
            f"{meta['seconds']:.1f} s.", ""]
  lines += _completion_sections(examples, probe_examples)
  return "\n".join(lines)
