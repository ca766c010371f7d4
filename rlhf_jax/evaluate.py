"""Evaluation of the policies (SFT, PPO, PPO-ptx, DPO, the gold-reward oracle) on held-out prompts,
with best-of-N baselines, the reward model's accuracy and the alignment tax: what InstructGPT
reports, plus the diagnostics that show why RLHF works (or does not) on the offline task.

For each policy, `samples_per_prompt` responses to each held-out prompt (the validation `prompts`
split) are sampled at `temperature` (default 1: the policy's own distribution), and:

  gold_win_rate_vs_sft  each policy sample against EVERY one of the `samples_per_prompt` SFT
                        baseline samples of the same prompt under the gold labeler (win 1, tie
                        0.5, loss 0), averaged. The baseline samples are drawn once, independently
                        of every policy's own samples (and of the best-of-N candidates), so SFT
                        against itself is computed (about 0.5), not assumed.
  gold_score            mean gold score of the samples.
  content_score         mean gold score with the filler words removed (correctness alone;
                        `gold_labeler.analyze`), so a gain in gold_score can be split into style
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
                        `gold_labeler.probe_score`; only the pretraining text teaches this, so a
                        drop from the base model is what RLHF costs and what the ptx term restores.

The base model (`<workdir>/pretrain/model` when it exists, row `base`) gets only pretrain_loss and
probe_score: it is no policy (it does not follow the prompt format).

DPO (`<workdir>/dpo/model`, row `dpo`) is a policy like the PPO runs (same samples, same gold
judge, KL to the same SFT model); its meta adds beta and its implicit-reward accuracy on the
held-out comparisons (`dpo_heldout`, from its stage meta).

Best-of-N (`best_of`, e.g. (4, 16)): for each prompt, N_max = max(best_of) SFT candidates are
sampled once (their own rng stream) and scored by the reward model and the gold labeler. The N_max
candidates are cut into N_max // N DISJOINT groups of N (consecutive columns; N_max // N
independent best-of-N draws per prompt, a single prefix when N = N_max); `best_of_n` picks the
best of each group by the RM (`bo{N}_rm`) or by the gold labeler (`bo{N}_gold`, the ceiling of
reranking), ties to the first. Each pick is compared with every SFT baseline sample of its prompt
like a policy sample; the standard error is over prompts, so the dependence between the picks of
one prompt (they share the baseline samples) is accounted for; their KL to SFT is the analytic KL
of best-of-N (the formulas: `eval_metrics`).

`rm`: the reward model's held-out accuracy read from its stage meta and, when the collect stage's
comparisons exist (`<workdir>/collect/tfds`, split `data.eval_split`), its pairwise accuracy on
those held-out comparisons of SFT samples against the labels and against the gold labeler,
overall, by instruction family and by the gold-score gap |gold_i - gold_j| of the pair (with the
labels' own agreement with gold, the noise ceiling, and the pair counts; `eval_rm_accuracy`).

Results go to `<workdir>/results.json`, and `<workdir>/results.md` with
`<workdir>/plots/overoptimisation.png` (`eval_results`), written atomically.

Every jitted function has fixed shapes (prompt batches are padded; best-of-N candidates are drawn
`samples_per_prompt` at a time with the same sampler), so the sampler and each scoring forward
compile once for all policies of the same shape.

Reading order: `evaluate` runs the phases of `_Evaluation` top to bottom (load the models and the
prompts; sample the SFT baseline; the base model, each policy, best-of-N; the RM's accuracy; the
meta; the report). The numbers come from `eval_metrics`, the alignment tax from
`eval_alignment_tax`, the RM's accuracy from `eval_rm_accuracy`, the text from `eval_results`.
"""
import json
import os
import platform
import time
import zlib

import jax
import numpy as np

from rlhf_jax import distributed
from rlhf_jax import eval_judge
from rlhf_jax import eval_metrics
from rlhf_jax import eval_results
from rlhf_jax import eval_rm_accuracy
from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.convert import load_model
from rlhf_jax.data import gold_labeler
from rlhf_jax.errors import UserError
from rlhf_jax.eval_alignment_tax import AlignmentTax
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import stage_io

POLICIES = ("sft", "ppo", "ppo_ptx", "dpo", "ppo_oracle")
BASELINE = "sft_baseline"    # the rng stream of the SFT samples every policy is compared with
CANDIDATES = "best_of_n"     # the rng stream of the best-of-N candidates


def validate(config):
  """One-line UserError for the first bad field of `config.eval`."""
  if "eval" not in config:
    raise UserError("config.eval is missing (expected the ConfigDict of configs/eval.py)")
  e = config.eval
  for field, minimum in (("num_prompts", 0), ("samples_per_prompt", 1), ("max_new_tokens", 1),
                         ("prompt_len", 1), ("batch_size", 1), ("seed", 0),
                         ("pretrain_batches", 0), ("pretrain_batch_size", 1),
                         ("pretrain_seq_len", 2), ("num_examples", 0), ("probe_prompts", 0),
                         ("probe_new_tokens", 1), ("rm_seq_len", 0)):
    if field not in e:
      raise UserError(f"config.eval.{field} is missing (see configs/eval.py)")
    value = e[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise UserError(f"config.eval.{field} must be an integer >= {minimum}, got {value!r}")
  judge = e.get("judge", "")
  if not isinstance(judge, str) or (judge and not os.path.exists(judge)):
    raise UserError(f"config.eval.judge: expected '' or a reward model directory (ours or a "
                    f"Hugging Face *ForSequenceClassification one), got {judge!r}")
  if not (isinstance(e.temperature, (int, float)) and e.temperature > 0):
    raise UserError(f"config.eval.temperature must be a number > 0, got {e.temperature!r}")
  if "best_of" not in e:
    raise UserError("config.eval.best_of is missing (see configs/eval.py)")
  best_of = e.best_of
  if (not isinstance(best_of, (tuple, list))
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in best_of)
      or len(set(best_of)) != len(best_of)):
    raise UserError(f"config.eval.best_of must be a list of distinct integers >= 1 (N of the "
                    f"best-of-N baselines; () = off), got {best_of!r}")


def _add_reference_free(row, extra, rm_scores, judge, baseline):
  """Adds the win rates under the RM (no gold labeler: the baseline has RM scores) and under the
  judge (config.eval.judge) of samples against the SFT `baseline` to `row` and `extra`."""
  fields, extras = eval_metrics.reference_free(
      rm_scores, None if baseline.gold is not None else baseline.rm, judge, baseline.judge)
  row.update(fields)
  extra.update(extras)


def _load_lm(path, where, mesh, reference_cfg=None):
  """The language model at `path`, its parameters sharded on `mesh`."""
  if not os.path.exists(path):
    raise UserError(f"{where}: {path} does not exist")
  model = load_model(path, mesh=mesh)
  if model.head != "lm":
    raise UserError(f"{where}: {path} holds a model with a {model.head!r} head; expected a policy "
                    "(language model)")
  if reference_cfg is not None:
    differ = stage_io.shape_fields_differ(model.cfg, reference_cfg)
    if differ:
      raise UserError(f"{where}: {path} has another shape than the SFT model ({'; '.join(differ)})")
  return model


def dpo_heldout(path):
  """The DPO stage's own held-out numbers (its stage meta): beta and the implicit-reward accuracy
  beta (log pi - log pi_SFT) on the held-out comparisons, against the labels and against gold."""
  meta_path = os.path.join(path, stage_io.STAGE_META)
  if not os.path.exists(meta_path):
    return {}
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  final = meta.get("final_eval") or {}
  return {"beta": meta.get("beta"), "implicit_reward_accuracy": final.get("accuracy"),
          "implicit_reward_gold_accuracy": final.get("gold_accuracy")}


def _stream(key, name):
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class _Sampled:
  """Samples of one policy (or the best-of-N candidates): texts [P][S], gold (P, S) or None,
  rm (P, S), kl (N,), tokens, ended, analysis (`eval_metrics.analysis_arrays`) or None."""

  def __init__(self):
    self.texts, self.gold, self.rm, self.kl, self.tokens, self.ended = [], None, [], [], [], []
    self.analysis = None
    self.judge = None          # (P, S) scores of config.eval.judge, when there is one


class _Evaluation:
  """One evaluation: the SFT policy and the reward model on the mesh, the held-out prompts and
  their batches, the samplers' settings, the jitted scorers and the progress bar. Each method is
  one phase of `evaluate`."""

  def __init__(self, config, workdir, sft_path, score_fn, analyze_fn):
    e = self.e = config.eval
    self.config = config
    self.mesh = sharding.make_mesh(config.get("mesh", {"shape": (1, -1, 1)}))
    rollout.batch_size_check(e.batch_size, self.mesh, "eval.batch_size")
    self.tfds_dir, data_tok_dir = stage_io.data_paths(config, workdir)
    self.offline = config.data.source == "offline"
    self.gold_fn = score_fn or (gold_labeler.gold_score if self.offline else None)
    self.analyze_fn = analyze_fn or (gold_labeler.analyze if self.offline else None)
    self._load_models(workdir, sft_path, data_tok_dir)
    self._load_prompts()
    self.judge = (eval_judge.Judge(e.judge, self.mesh, e.prompt_len + e.max_new_tokens,
                                   e.batch_size) if e.get("judge") else None)
    self.s = e.samples_per_prompt
    self.best_of = sorted(e.best_of)
    self.n_max = max(self.best_of) if self.best_of else 0
    self.chunks = -(-self.n_max // self.s)
    tok = self.tok
    self.sc = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=float(e.temperature),
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    self.logprob = rollout.JittedOnMesh(rollout.make_logprob_fn(self.cfg, e.max_new_tokens,
                                                                float(e.temperature)), self.mesh)
    self.reward = rollout.JittedOnMesh(rollout.make_reward_fn(self.rm_cfg), self.mesh)
    self.bar = None

  def _load_models(self, workdir, sft_path, data_tok_dir):
    """The SFT policy (the baseline and the KL reference), the tokenizer and the reward model."""
    e = self.e
    sft_model = _load_lm(sft_path, "evaluate: sft", self.mesh)
    cfg = self.cfg = sft_model.cfg
    if e.prompt_len + e.max_new_tokens > cfg.max_len:
      raise UserError(f"config.eval.prompt_len + config.eval.max_new_tokens = "
                      f"{e.prompt_len + e.max_new_tokens} exceeds the model's max_len "
                      f"{cfg.max_len}")
    if e.prompt_len + e.probe_new_tokens > cfg.max_len:
      raise UserError(f"config.eval.prompt_len + config.eval.probe_new_tokens = "
                      f"{e.prompt_len + e.probe_new_tokens} exceeds the model's max_len "
                      f"{cfg.max_len}")
    self.tok, _ = stage_io.load_tokenizer_for(self.config, sft_model.tokenizer_dir, data_tok_dir,
                                              cfg)
    self.sft_params = sft_model.params
    del sft_model
    self.rm_path = os.path.join(workdir, "rm", "model") if e.rm_path == "auto" else e.rm_path
    if not os.path.exists(self.rm_path):
      raise UserError(f"config.eval.rm_path: no reward model at {self.rm_path} (run the rm stage "
                      "first)")
    self.rm_cfg, self.rm_params = stage_io.load_scalar_model(self.rm_path, cfg, "eval.rm_path",
                                                             self.mesh)
    self.comparisons_dir = os.path.join(workdir, "collect", "tfds")
    if self.offline and os.path.isdir(self.comparisons_dir):
      eval_rm_accuracy.comparison_seq_len(self.config, self.rm_cfg.max_len)   # fails early

  def _load_prompts(self):
    """The held-out prompts and their batches; the pretraining batches and the probe prompts."""
    e, tok = self.e, self.tok
    records = rollout.split_prompts(self.tfds_dir, self.config.data.eval_split, "eval_split",
                                    e.num_prompts)
    self.prompts = [r["prompt"] for r in records]
    self.batches = list(rollout.prompt_batches(records, tok, e.batch_size, e.prompt_len))
    self.key = jax.random.key(e.seed)
    self.tax = AlignmentTax(self.config, self.tfds_dir, tok, self.cfg, self.mesh, self.key)

  def start(self, names, base_path):
    """The line saying what is evaluated, and the progress bar over every sampler call."""
    e, probes = self.e, self.tax.prompts
    print(f"evaluate: {', '.join(names)} on {len(self.prompts)} held-out prompts x {self.s} "
          f"samples (temperature {e.temperature}), best-of-{self.best_of or 'N off'}, reward "
          f"model {self.rm_path}" + (f", {len(probes)} probe prompts" if probes else ""),
          flush=True)
    models = len(names) + (base_path is not None)
    self.bar = rollout.progress(len(self.batches) * (len(names) + 1 + self.chunks)
                                + len(self.tax.batches or ()) * models, "evaluate")

  def sample(self, name, params, score, num_chunks=1, kl=True):
    """Samples (and scores, when `score`) every prompt batch with the policy's own rng stream:
    `num_chunks` sampler calls of `s` samples per prompt and batch (the same compiled sampler)."""
    s, prompts = self.s, self.prompts
    got, stream = _Sampled(), _stream(self.key, name)
    n, width = len(prompts), s * num_chunks
    texts = [[] for _ in range(n)]
    rm_scores = np.zeros((n, width))
    for b, batch in enumerate(self.batches):
      valid = np.repeat(batch["index"] >= 0, s)
      index = batch["index"][batch["index"] >= 0]
      for c in range(num_chunks):
        rng = jax.random.fold_in(stream, b) if num_chunks == 1 else jax.random.fold_in(
            jax.random.fold_in(stream, b), c)
        out = rollout.sample_batch(params, self.cfg, batch, self.mesh, self.e.batch_size, rng,
                                   self.sc, s)
        t, ended = rollout.decode_responses(self.tok, out["tokens"][valid], out["lengths"][valid])
        for r, i in enumerate(index):
          texts[i].extend(t[r * s:(r + 1) * s])
        got.ended.append(ended)
        got.tokens.append(out["lengths"][valid] - ended)
        if score:
          seqs = rollout.sequences(batch["tokens"], batch["segment_ids"], out, s)
          rm_scores[index, c * s:(c + 1) * s] = self.reward(self.rm_params,
                                                            seqs)[valid].reshape(-1, s)
          if kl:     # a policy: the Monte-Carlo KL to SFT
            lp = self.logprob(params, seqs)
            lp_ref = self.logprob(self.sft_params, seqs)
            got.kl.append(eval_metrics.sequence_kl(lp, lp_ref, out["mask"])[valid])
        self.bar.update(1)
    got.texts = texts
    got.rm = rm_scores
    self._judge(got, width)
    return got

  def _judge(self, got, width):
    """The gold scores and the style analysis of the texts of `got`, (P, width) each."""
    prompts = self.prompts
    n = len(prompts)
    flat = [(prompts[i], t) for i in range(n) for t in got.texts[i]]
    if self.gold_fn is not None:
      got.gold = np.asarray([self.gold_fn(p, t) for p, t in flat], np.float64).reshape(n, width)
    if self.analyze_fn is not None:
      got.analysis = eval_metrics.analysis_arrays([self.analyze_fn(p, t) for p, t in flat],
                                                  (n, width))
    if self.judge is not None:
      got.judge = self.judge.scores(flat).reshape(n, width)

  def base_row(self, base_path):
    """(row, meta) of the pretrained base model: pretrain loss and capability probe only."""
    params = _load_lm(base_path, "evaluate: base", self.mesh, self.cfg).params
    row, _ = eval_metrics.results_row(pretrain_loss=self.tax.pretrain_loss(params),
                                      probe=self.tax.probe(eval_results.BASE, params, self.bar))
    return row, {"path": os.path.abspath(base_path)}

  def policy_row(self, name, path, baseline):
    """(row, meta, samples) of one policy against the SFT `baseline` samples."""
    if name == "sft":
      params = self.sft_params
    else:
      params = _load_lm(path, f"evaluate: {name}", self.mesh, self.cfg).params
    got = self.sample(name, params, score=True)
    row, extra = eval_metrics.results_row(
        got.gold, baseline.gold, got.analysis, got.rm, float(np.concatenate(got.kl).mean()),
        self.tax.pretrain_loss(params), self.tax.probe(name, params, self.bar))
    _add_reference_free(row, extra, got.rm, got.judge, baseline)
    extra.update(path=os.path.abspath(path),
                 mean_response_tokens=float(np.concatenate(got.tokens).mean()),
                 no_eos_fraction=float(1.0 - np.concatenate(got.ended).mean()))
    if name == "dpo":
      extra.update(dpo_heldout(path))
    return row, extra, got

  def best_of_n_rows(self, baseline):
    """({bo{N}_{rm,gold}: row}, {name: meta}) from n_max SFT candidates per prompt, their own
    rng stream, picked by the RM and by gold (`eval_metrics.best_of_n`)."""
    rows, meta = {}, {}
    if not self.best_of:
      return rows, meta
    cand = self.sample(CANDIDATES, self.sft_params, score=True, num_chunks=self.chunks, kl=False)
    n_max = self.n_max
    cand.rm = cand.rm[:, :n_max]
    cand.gold = None if cand.gold is None else cand.gold[:, :n_max]
    cand.judge = None if cand.judge is None else cand.judge[:, :n_max]
    if cand.analysis is not None:
      cand.analysis = {k: v[:, :n_max] for k, v in cand.analysis.items()}
    for n in self.best_of:
      for by, scores in (("rm", cand.rm), ("gold", cand.gold)):
        if scores is None:
          continue
        pick = eval_metrics.best_of_n(scores, n)
        row, extra = eval_metrics.results_row(
            None if cand.gold is None else np.take_along_axis(cand.gold, pick, 1),
            baseline.gold,
            None if cand.analysis is None else eval_metrics.take_columns(cand.analysis, pick),
            np.take_along_axis(cand.rm, pick, 1), eval_metrics.best_of_n_kl(n))
        _add_reference_free(row, extra, np.take_along_axis(cand.rm, pick, 1),
                            None if cand.judge is None else np.take_along_axis(cand.judge, pick, 1),
                            baseline)
        name = f"bo{n}_{by}"
        extra.update(n=n, selected_by=by, picks_per_prompt=int(pick.shape[1]))
        rows[name], meta[name] = row, extra
    return rows, meta

  def meta(self, meta_policies, meta_best, t0):
    """results['meta']: what was evaluated, how, on which machine (and the judge, when one)."""
    e, device = self.e, jax.devices()[0]
    return ({"judge": self.judge.path} if self.judge is not None else {}) | {
        "prompts": len(self.prompts), "samples_per_prompt": self.s, "seed": e.seed,
        "temperature": float(e.temperature), "max_new_tokens": e.max_new_tokens,
        "split": self.config.data.eval_split, "rm_path": os.path.abspath(self.rm_path),
        "gold_labeler": self.gold_fn is not None, "style": self.analyze_fn is not None,
        "pretrain_batches": 0 if self.tax.ptx is None else len(self.tax.ptx),
        "probe_prompts": len(self.tax.prompts or ()), "probe_new_tokens": e.probe_new_tokens,
        "best_of": self.best_of, "best_of_candidates": self.n_max,
        "policies": meta_policies, "best_of_n": meta_best,
        "machine": {"host": platform.node(), "platform": platform.platform(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "device_kind": device.device_kind, "device_count": jax.device_count(),
                    "process_count": jax.process_count()},
        "plot": eval_results.PLOT,           # written by process 0 below
        "seconds": time.time() - t0,
    }

  def report(self, workdir, results, names, samples, t0):
    """results.json, results.md and the plot (process 0), and the console table."""
    rows = eval_results.table_rows(results, names)
    examples = eval_results.sample_completions(self.prompts, samples, names, self.e.num_examples)
    probe_examples = eval_results.probe_completions(self.tax.prompts, self.tax.texts,
                                                    self.e.num_examples)
    if jax.process_index() == 0:
      eval_results.plot(workdir, results, names)
      results["meta"]["seconds"] = time.time() - t0
      eval_results.write_atomic(os.path.join(workdir, "results.json"),
                                json.dumps(results, indent=2) + "\n")
      eval_results.write_atomic(os.path.join(workdir, "results.md"),
                                eval_results.format_markdown(results, rows, examples,
                                                             probe_examples))
    distributed.barrier("rlhf_jax_results_written")   # the pipeline's marker, read by all
    print(eval_results.table(results, rows), flush=True)
    print(f"evaluate: results in {os.path.join(workdir, 'results.json')} and results.md "
          f"({results['meta']['seconds']:.1f} s)", flush=True)


def evaluate(config, workdir, policies, score_fn=None, base_path=None, analyze_fn=None):
  """Evaluates `policies` ({name: model dir}, 'sft' required) and writes results.json/results.md
  and plots/overoptimisation.png in `workdir`; returns the results dict (see the module doc).

  `score_fn(prompt, response)` is the gold labeler: default the offline task's `gold_score` when
  `config.data.source` is 'offline', else none (the gold metrics are then None). `analyze_fn`
  (default `gold_labeler.analyze` on the offline task, else none) gives the style columns.
  `base_path`: the pretrained base model (row `base`: pretrain loss and capability probe only).
  The RM accuracy tables are computed when `<workdir>/collect/tfds` exists (offline task).
  """
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  validate(config)
  if "sft" not in policies:
    raise UserError("evaluate: the policies must include 'sft' (the baseline of the win rate and "
                    "the reference of the KL)")
  names = ["sft"] + [n for n in policies if n != "sft"]
  ev = _Evaluation(config, workdir, policies["sft"], score_fn, analyze_fn)
  ev.start(names, base_path)
  results, meta_policies, samples = {}, {}, {}
  try:
    # Without a gold labeler the baseline is scored by the RM: the policies' RM win rate.
    baseline = ev.sample(BASELINE, ev.sft_params, score=ev.gold_fn is None, kl=False)
    if base_path is not None:
      results[eval_results.BASE], meta_policies[eval_results.BASE] = ev.base_row(base_path)
    for name in names:
      results[name], meta_policies[name], samples[name] = ev.policy_row(name, policies[name],
                                                                         baseline)
    best_rows, meta_best = ev.best_of_n_rows(baseline)
  finally:
    ev.bar.close()
  results["best_of_n"] = best_rows
  results["rm"] = eval_rm_accuracy.section(config, ev.rm_path, ev.comparisons_dir, ev.tok,
                                           ev.rm_cfg, ev.rm_params, ev.mesh)
  results["meta"] = ev.meta(meta_policies, meta_best, t0)
  ev.report(workdir, results, names, samples, t0)
  return results


def run(config, workdir):
  """Evaluates the policies of `workdir` (sft required; ppo, ppo_ptx, dpo and ppo_oracle when their
  models exist) and the base model `<workdir>/pretrain/model` when it exists."""
  workdir = os.path.abspath(workdir)
  policies = {name: os.path.join(workdir, name, "model") for name in POLICIES
              if os.path.exists(os.path.join(workdir, name, "model"))}
  if "sft" not in policies:
    raise UserError(f"evaluate: {os.path.join(workdir, 'sft', 'model')} does not exist; run the "
                    "sft stage first")
  base = os.path.join(workdir, "pretrain", "model")
  return evaluate(config, workdir, policies, base_path=base if os.path.exists(base) else None)
