"""Evaluation of the policies (SFT, PPO, PPO-ptx) on held-out prompts: what InstructGPT reports.

For each policy, `samples_per_prompt` responses to each held-out prompt (the validation `prompts`
split) are sampled at `temperature` (default 1: the policy's own distribution), and:

  gold_win_rate_vs_sft  each policy sample against an SFT sample to the same prompt under the
                        offline task's gold labeler: win 1, tie 0.5, loss 0, averaged. The SFT
                        samples it is compared with are drawn once, independently of every policy's
                        own samples, so SFT against itself is computed (about 0.5), not assumed.
  gold_score            mean gold score of the samples.
  rm_score              mean reward-model score (`<workdir>/rm/model`, read at the last token).
  kl_to_sft             mean over samples of sum_t (log pi(y_t) - log pi_SFT(y_t)) over the response
                        tokens (EOS included), log-probs at the sampling temperature from a forward
                        pass of both models: the usual Monte-Carlo estimate of KL(pi || pi_SFT).
  pretrain_loss         mean token NLL on the held-out pretraining text (`ptx` validation split,
                        the first `pretrain_batches` packed batches): the alignment tax.

and `rm`: the reward model's held-out accuracy against the labels and the gold labeler, read from
its stage meta. The win rate's standard error is over prompts (the samples of one prompt are not
independent): se = std_p(mean_s outcome[p, s]) / sqrt(P).

Results go to `<workdir>/results.json` and `<workdir>/results.md` (the table, 95% intervals and a
few completions per policy for the same prompts), both written atomically.

Every jitted function has fixed shapes (prompt batches are padded), so the sampler and each scoring
forward compile once for all policies of the same shape.
"""
import json
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

POLICIES = ("sft", "ppo", "ppo_ptx")
METRICS = ("gold_win_rate_vs_sft", "gold_score", "rm_score", "kl_to_sft", "pretrain_loss")
BASELINE = "sft_baseline"   # the rng stream of the SFT samples every policy is compared with


def default_config(preset="tiny"):
  """The `eval` ConfigDict (embedded as `config.eval` next to the usual `data` and `mesh`)."""
  c = ml_collections.ConfigDict()
  c.num_prompts = 0            # held-out prompts (data.eval_split of `prompts`); 0 = all (200)
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
  if preset == "tiny":
    c.max_new_tokens, c.prompt_len, c.batch_size = 24, 24, 40   # max_new_tokens: PPO response_len
    c.pretrain_seq_len = 128
  elif preset == "smollm2":
    c.max_new_tokens, c.prompt_len, c.batch_size = 32, 48, 32
    c.pretrain_seq_len = 256
  return c


# ----------------------------------------------------------------------------- the arithmetic

def win_outcomes(scores, baseline):
  """Elementwise outcome of `scores` against `baseline`: 1 if greater, 0.5 if equal, 0 if less."""
  scores, baseline = np.asarray(scores, np.float64), np.asarray(baseline, np.float64)
  return (scores > baseline) + 0.5 * (scores == baseline)


def win_rate(scores, baseline):
  """(rate, standard error) of (P, S) scores against (P, S) baseline scores.

    rate = mean_{p,s} outcome[p, s]
    se   = std_p(m_p, ddof=1) / sqrt(P),  m_p = mean_s outcome[p, s]   (0 when P = 1)
  """
  outcome = win_outcomes(scores, baseline).reshape(np.shape(scores)[0], -1)
  per_prompt = outcome.mean(axis=1)
  n = len(per_prompt)
  se = float(per_prompt.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
  return float(outcome.mean()), se


def interval95(rate, se):
  """Normal 95% interval rate -+ 1.96 se, clipped to [0, 1]."""
  return [max(0.0, rate - 1.96 * se), min(1.0, rate + 1.96 * se)]


def sequence_kl(logp, logp_ref, mask):
  """Per sample: sum_t mask[t] * (logp[t] - logp_ref[t]), (N, T) -> (N,) in float64."""
  diff = np.asarray(logp, np.float64) - np.asarray(logp_ref, np.float64)
  return (diff * np.asarray(mask, np.float64)).sum(axis=1)


# ----------------------------------------------------------------------------- jitted pieces

def make_logprob_fn(cfg, num_new, temperature):
  """(params, batch) -> (B, num_new) log-probs of the last `num_new` tokens of `batch['tokens']`
  (prompt ++ response), each predicted from the position before it."""
  from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top

  def fn(params, batch):
    logits = common.forward(cfg, "lm", params, batch)
    width = batch["tokens"].shape[1]
    return losses.token_logprobs(logits[:, width - num_new - 1:width - 1],
                                 batch["tokens"][:, width - num_new:], temperature)[0]
  return fn


def make_reward_fn(cfg):
  """(params, batch) -> (B,) scalar head at `batch['last_index']`."""
  from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top

  def fn(params, batch):
    values = common.forward(cfg, "scalar", params,
                            {"tokens": batch["tokens"], "segment_ids": batch["segment_ids"]})
    return losses.gather_last(values, batch["last_index"])
  return fn


def make_lm_loss_fn(cfg):
  from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top

  def fn(params, batch):
    logits = common.forward(cfg, "lm", params, batch)
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
    from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top
    size = len(next(iter(host_batch.values())))
    rows = sharding.process_batch_rows(self.mesh, size)
    local = {k: v[rows] for k, v in host_batch.items()}
    if self.step is None:
      self.step = common.jit_eval_step(self.fn, jax.tree.map(lambda x: x.sharding, params),
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
                         ("pretrain_seq_len", 2), ("num_examples", 0)):
    if field not in e:
      raise UserError(f"config.eval.{field} is missing (see rlhf_jax.evaluate.default_config)")
    value = e[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise UserError(f"config.eval.{field} must be an integer >= {minimum}, got {value!r}")
  if not (isinstance(e.temperature, (int, float)) and e.temperature > 0):
    raise UserError(f"config.eval.temperature must be a number > 0, got {e.temperature!r}")


def _load_lm(path, where, reference_cfg=None):
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f"{where}: {path} does not exist")
  model = load_model(path)
  if model.head != "lm":
    raise UserError(f"{where}: {path} holds a model with a {model.head!r} head; expected a policy "
                    "(language model)")
  if reference_cfg is not None:
    differ = common.shape_fields_differ(model.cfg, reference_cfg)
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
  """All samples of one policy: texts (P, S), gold (P, S) or None, rm, kl, lengths."""

  def __init__(self):
    self.texts, self.gold, self.rm, self.kl, self.tokens, self.ended = [], [], [], [], [], []


def _pretrain_batches(config, tfds_dir, tok, mesh):
  """The first `pretrain_batches` packed held-out pretraining batches, or None when the data has
  no pretraining text."""
  from rlhf_jax.data import builders, loaders  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top
  e = config.eval
  if not e.pretrain_batches or not builders.RlhfPtx(data_dir=tfds_dir).is_prepared():
    return None
  collect.batch_size_check(e.pretrain_batch_size, mesh, "eval.pretrain_batch_size")
  source = common.load_split(tfds_dir, "ptx", config.data.eval_split, "eval_split")
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


def evaluate(config, workdir, policies, score_fn=None):
  """Evaluates `policies` ({name: model dir}, 'sft' required) and writes results.json/results.md
  in `workdir`; returns the results dict (see the module docstring).

  `score_fn(prompt, response)` is the gold labeler: default the offline task's `gold_score` when
  `config.data.source` is 'offline', else none (the gold metrics are then None).
  """
  from rlhf_jax.data import offline_task  # pylint: disable=g-import-not-at-top
  from rlhf_jax.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import common  # pylint: disable=g-import-not-at-top
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
  tfds_dir, data_tok_dir = common.data_paths(config, workdir)
  gold_fn = score_fn or (offline_task.gold_score if config.data.source == "offline" else None)

  sft = _load_lm(policies["sft"], "evaluate: sft")
  cfg = sft.cfg
  if e.prompt_len + e.max_new_tokens > cfg.max_len:
    raise UserError(f"config.eval.prompt_len + config.eval.max_new_tokens = "
                    f"{e.prompt_len + e.max_new_tokens} exceeds the model's max_len {cfg.max_len}")
  tok, _ = common.load_tokenizer_for(config, sft.tokenizer_dir, data_tok_dir, cfg)
  sft_params = collect.place_params(sft.params, cfg, "lm", mesh)
  del sft
  rm_path = os.path.join(workdir, "rm", "model") if e.rm_path == "auto" else e.rm_path
  if not os.path.exists(rm_path):
    raise UserError(f"config.eval.rm_path: no reward model at {rm_path} (run the rm stage first)")
  rm_cfg, rm_params = common.load_scalar_model(rm_path, cfg, "eval.rm_path")
  rm_params = collect.place_params(rm_params, rm_cfg, "scalar", mesh)

  records = collect.split_prompts(tfds_dir, config.data.eval_split, "eval_split", e.num_prompts)
  prompts = [r["prompt"] for r in records]
  batches = list(collect.prompt_batches(records, tok, e.batch_size, e.prompt_len))
  ptx = _pretrain_batches(config, tfds_dir, tok, mesh)
  s = e.samples_per_prompt
  sc = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=float(e.temperature),
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  logprob = _Jitted(make_logprob_fn(cfg, e.max_new_tokens, float(e.temperature)), mesh)
  reward = _Jitted(make_reward_fn(rm_cfg), mesh)
  lm_loss = _Jitted(make_lm_loss_fn(cfg), mesh)
  key = jax.random.key(e.seed)
  print(f"evaluate: {', '.join(names)} on {len(prompts)} held-out prompts x {s} samples "
        f"(temperature {e.temperature}), reward model {rm_path}", flush=True)
  bar = collect.progress(len(batches) * (len(names) + 1), "evaluate")

  def run_policy(name, params, score):
    """Samples (and scores, when `score`) every prompt batch with the policy's own rng stream."""
    got, stream = _Sampled(), _stream(key, name)
    for b, batch in enumerate(batches):
      out = collect.sample_batch(params, cfg, batch, mesh, e.batch_size,
                                 jax.random.fold_in(stream, b), sc, s)
      valid = np.repeat(batch["index"] >= 0, s)
      texts, ended = collect.decode_responses(tok, out["tokens"][valid], out["lengths"][valid])
      got.texts.extend(texts)
      got.ended.append(ended)
      got.tokens.append(out["lengths"][valid] - ended)
      if score:
        seqs = sequences(batch["tokens"], batch["segment_ids"], out, s)
        got.rm.append(reward(rm_params, seqs)[valid])
        lp = logprob(params, seqs)
        lp_ref = logprob(sft_params, seqs)
        got.kl.append(sequence_kl(lp, lp_ref, out["mask"])[valid])
      bar.update(1)
    n = len(prompts)
    if gold_fn is not None:
      got.gold = np.asarray([gold_fn(prompts[i // s], t) for i, t in enumerate(got.texts)],
                            np.float64).reshape(n, s)
    got.texts = [got.texts[i * s:(i + 1) * s] for i in range(n)]
    return got

  def pretrain_loss(params):
    if ptx is None:
      return None
    total = count = 0.0
    for batch in ptx:
      loss_sum, n = lm_loss(params, batch)
      total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)

  try:
    baseline = run_policy(BASELINE, sft_params, score=False)
    results, meta_policies, samples = {}, {}, {}
    for name in names:
      if name == "sft":
        params = sft_params
      else:
        model = _load_lm(policies[name], f"evaluate: {name}", cfg)
        params = collect.place_params(model.params, cfg, "lm", mesh)
        del model
      got = run_policy(name, params, score=True)
      row = dict.fromkeys(METRICS)
      extra = {"path": os.path.abspath(policies[name])}
      if got.gold is not None:
        rate, se = win_rate(got.gold, baseline.gold)
        row["gold_win_rate_vs_sft"], row["gold_score"] = rate, float(got.gold.mean())
        extra.update(win_rate_stderr=se, win_rate_interval95=interval95(rate, se))
      row["rm_score"] = float(np.concatenate(got.rm).mean())
      row["kl_to_sft"] = float(np.concatenate(got.kl).mean())
      row["pretrain_loss"] = pretrain_loss(params)
      extra.update(mean_response_tokens=float(np.concatenate(got.tokens).mean()),
                   no_eos_fraction=float(1.0 - np.concatenate(got.ended).mean()))
      results[name], meta_policies[name], samples[name] = row, extra, got
  finally:
    bar.close()
  results["rm"] = _rm_meta(rm_path)
  device = jax.devices()[0]
  results["meta"] = {
      "prompts": len(prompts), "samples_per_prompt": s, "seed": e.seed,
      "temperature": float(e.temperature), "max_new_tokens": e.max_new_tokens,
      "split": config.data.eval_split, "rm_path": os.path.abspath(rm_path),
      "gold_labeler": gold_fn is not None,
      "pretrain_batches": 0 if ptx is None else len(ptx),
      "policies": meta_policies,
      "machine": {"host": platform.node(), "platform": platform.platform(),
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "device_kind": device.device_kind, "device_count": jax.device_count(),
                  "process_count": jax.process_count()},
      "seconds": time.time() - t0,
  }
  examples = _examples(prompts, samples, names, e.num_examples)
  markdown = format_markdown(results, names, examples)
  if jax.process_index() == 0:
    _write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2) + "\n")
    _write_atomic(os.path.join(workdir, "results.md"), markdown)
  print(table(results, names), flush=True)
  print(f"evaluate: results in {os.path.join(workdir, 'results.json')} and results.md "
        f"({results['meta']['seconds']:.1f} s)", flush=True)
  return results


def run(config, workdir):
  """Evaluates the policies of `workdir` (sft required; ppo and ppo_ptx when their models exist)."""
  workdir = os.path.abspath(workdir)
  policies = {name: os.path.join(workdir, name, "model") for name in POLICIES
              if os.path.exists(os.path.join(workdir, name, "model"))}
  if "sft" not in policies:
    raise UserError(f"evaluate: {os.path.join(workdir, 'sft', 'model')} does not exist; run the "
                    "sft stage first")
  return evaluate(config, workdir, policies)


# ----------------------------------------------------------------------------- reports

def _write_atomic(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _examples(prompts, samples, names, count):
  """[(prompt, [(policy, response, gold or None)])] for the first `count` prompts (sample 0)."""
  out = []
  for i in range(min(count, len(prompts))):
    rows = [(n, samples[n].texts[i][0],
             None if samples[n].gold is None else float(samples[n].gold[i, 0])) for n in names]
    out.append((prompts[i], rows))
  return out


def _num(v, fmt="{:.3f}"):
  return "n/a" if v is None else fmt.format(v)


def table(results, names):
  """The results as a markdown table (one row per policy)."""
  lines = ["| policy | gold win rate vs SFT [95% CI] | gold score | RM score | KL to SFT (nats) "
           "| pretrain loss |", "|---|---|---|---|---|---|"]
  for n in names:
    r, m = results[n], results["meta"]["policies"][n]
    win = _num(r["gold_win_rate_vs_sft"])
    if "win_rate_interval95" in m:
      lo, hi = m["win_rate_interval95"]
      win += f" [{lo:.3f}, {hi:.3f}]"
    lines.append(f"| {n} | {win} | {_num(r['gold_score'])} | {_num(r['rm_score'])} | "
                 f"{_num(r['kl_to_sft'])} | {_num(r['pretrain_loss'])} |")
  return "\n".join(lines)


def format_markdown(results, names, examples):
  """results.md: the table, how it was measured, the reward model's accuracy, sample completions."""
  meta, rm = results["meta"], results["rm"]
  lines = ["# Evaluation", "",
           f"{meta['prompts']} held-out prompts (`{meta['split']}` split) x "
           f"{meta['samples_per_prompt']} samples per policy, temperature {meta['temperature']}, "
           f"at most {meta['max_new_tokens']} new tokens, seed {meta['seed']}.", "",
           table(results, names), "",
           "* **gold win rate vs SFT**: each sample against an independent SFT sample to the same "
           "prompt under the gold labeler (win 1, tie 0.5, loss 0); the 95% interval is "
           "+-1.96 standard errors over prompts." if meta["gold_labeler"] else
           "* No gold labeler for this data (only the offline task has one): no win rate.",
           "* **KL to SFT**: mean over samples of the summed log-ratio log pi - log pi_SFT over "
           "the response tokens (at the sampling temperature).",
           f"* **pretrain loss**: token NLL on {meta['pretrain_batches']} packed batches of "
           "held-out pretraining text (the alignment tax).", "",
           f"Reward model ({meta['rm_path']}): held-out accuracy {_num(rm['heldout_accuracy'])}, "
           f"against the gold labeler {_num(rm['gold_accuracy'])}.", "",
           f"Machine: {meta['machine']['host']}, {meta['machine']['backend']} "
           f"({meta['machine']['device_kind']} x{meta['machine']['device_count']}), "
           f"{meta['seconds']:.1f} s.", ""]
  if examples:
    lines += ["## Sample completions", ""]
    for i, (prompt, rows) in enumerate(examples, start=1):
      lines += [f"**Prompt {i}:** `{json.dumps(prompt)}`", ""]
      for name, response, gold in rows:
        lines.append(f"* {name} (gold {_num(gold, '{:.2f}')}): `{json.dumps(response)}`")
      lines.append("")
  return "\n".join(lines)
