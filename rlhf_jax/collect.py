"""Stage 'collect': comparisons for the reward model, sampled from the SFT policy (InstructGPT).

For every prompt of the `prompts` splits (train and validation) the SFT policy samples K responses
(temperature `config.temperature`, K drawn per prompt in `min_k..max_k`; the paper shows labelers
4 to 9) and the simulated labeler ranks them: Plackett-Luce over the offline task's gold scores with
Bradley-Terry noise, `P(i preferred to j) = sigmoid((gold_i - gold_j) / labeler_temperature)`
(`rlhf_jax.data.labelers`). A prompt whose K responses all tie holds no preference and is dropped.

  python -m rlhf_jax.main --config=configs/collect.py:tiny     # from <workdir>/sft/model

Output, `<workdir>/collect/` (written in `<workdir>/.collect.partial` and renamed into place, the
marker `collect.json` written last, so a crash never leaves a half-finished directory):
  comparisons_{split}.jsonl   the records (schema `comparisons`)
  tfds/                       the same as a TFDS comparisons dataset (the RM reads it with
                              `config.data.comparisons_dir=<workdir>/collect`)
  collect.json                what was done: K, temperatures, per split the prompts, records,
                              fraction dropped for all-ties, mean gold score of the SFT samples

Sampling is one jitted call per batch of `batch_size` prompts (fixed shapes: every batch has the
same prompt width and `max_k` samples per prompt, so the sampler compiles once); the parameters
are sharded over `config.mesh` by the rule table and the prompts over its batch axes.

The gold labeler exists only for the offline task; with other data give the reward model
comparisons instead (a `comparisons` dataset in the data dir).
"""
import json
import os
import shutil
import time
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.data import builders, gold_labeler, labelers, schema
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import stage_io

DONE_FILE = "collect.json"
STAGE = "collect"


# ----------------------------------------------------------------------------- config

def _int(config, field, minimum):
  if field not in config:
    raise UserError(f"config.{field} is missing (see configs/collect.py)")
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise UserError(f"config.{field} must be an integer >= {minimum}, got {value!r}")
  return value


def validate(config):
  """One-line UserError for the first bad field of a collect config."""
  if config.data.source != "offline":
    raise UserError(f"config.data.source is {config.data.source!r}: collection needs a labeler, "
                    "and the simulated one only exists for the offline task; give the reward model "
                    "comparisons instead (a comparisons dataset in the data dir)")
  cfg = ModelConfig.from_dict(config.model)
  sharding.parse_mesh_shape(config.mesh.shape, "config.mesh.shape")
  for field in ("num_train_prompts", "num_eval_prompts", "seed"):
    _int(config, field, 0)
  for field in ("max_new_tokens", "prompt_len", "batch_size"):
    _int(config, field, 1)
  min_k, max_k = _int(config, "min_k", schema.MIN_K), _int(config, "max_k", schema.MIN_K)
  if not min_k <= max_k <= schema.MAX_K:
    raise UserError(f"config.min_k ({min_k}) and config.max_k ({max_k}) must satisfy "
                    f"{schema.MIN_K} <= min_k <= max_k <= {schema.MAX_K}")
  if not (isinstance(config.temperature, (int, float)) and config.temperature > 0):
    raise UserError(f"config.temperature must be a number > 0, got {config.temperature!r}")
  if not (isinstance(config.labeler_temperature, (int, float))
          and config.labeler_temperature >= 0):
    raise UserError("config.labeler_temperature must be a number >= 0 (gold-score units), got "
                    f"{config.labeler_temperature!r}")
  if config.prompt_len + config.max_new_tokens > cfg.max_len:
    raise UserError(f"config.prompt_len + config.max_new_tokens = "
                    f"{config.prompt_len + config.max_new_tokens} exceeds config.model.max_len "
                    f"({cfg.max_len})")
  if not config.init_from:
    raise UserError("config.init_from: collection samples from a policy; give the SFT model "
                    "('auto' = <workdir>/sft/model)")
  if config.data.train_split == config.data.eval_split:
    raise UserError(f"config.data.train_split and config.data.eval_split are both "
                    f"{config.data.train_split!r}; they must differ")
  return cfg


# ----------------------------------------------------------------------------- labeling

def prompt_rng(seed, split_code, index):
  """The numpy Generator that draws prompt `index`'s K and its labeler noise (split_code 0 train,
  1 validation): the same records whatever the batch size or the number of hosts."""
  return np.random.default_rng([seed, split_code, index])


def label_prompts(prompts, samples, score_fn, *, seed, split_code, min_k, max_k, temperature):
  """Comparison records from `samples[i]` (max_k responses to `prompts[i]`).

  Prompt i: rng = prompt_rng(seed, split_code, i); K = rng.integers(min_k, max_k + 1); its first K
  samples are ranked by `labelers.label_comparisons` with that rng. All-tie prompts are dropped.

  Returns (records, kept) with `kept` the indices of the prompts that gave a record.
  """
  records, kept = [], []
  for i, (prompt, candidates) in enumerate(zip(prompts, samples)):
    rng = prompt_rng(seed, split_code, i)
    k = int(rng.integers(min_k, max_k + 1))
    out = labelers.label_comparisons([prompt], [list(candidates[:k])], score_fn, rng, temperature)
    if out:
      records.extend(out)
      kept.append(i)
  return records, kept


def split_stats(prompts, samples, ended, records, score_fn, max_new_tokens, token_counts):
  """What collect.json says about one split."""
  gold = np.asarray([[score_fn(p, r) for r in rs] for p, rs in zip(prompts, samples)], np.float64)
  n = len(prompts)
  dropped = n - len(records)
  pairs = sum(int(np.sum(np.asarray(r["ranks"])[:, None] < np.asarray(r["ranks"])[None, :]))
              for r in records)
  return {"prompts": n, "records": len(records), "dropped_all_ties": dropped,
          "dropped_fraction": dropped / max(n, 1),
          "mean_k": float(np.mean([len(r["responses"]) for r in records])) if records else 0.0,
          "pairs": pairs,
          "mean_gold_score": float(gold.mean()) if gold.size else 0.0,
          "gold_score_std": float(gold.std()) if gold.size else 0.0,
          "mean_response_tokens": float(np.mean(token_counts)) if len(token_counts) else 0.0,
          "no_eos_fraction": float(1.0 - np.mean(ended)) if len(ended) else 0.0,
          "max_new_tokens": max_new_tokens}


# ----------------------------------------------------------------------------- the stage

def collect_dir(workdir):
  return os.path.join(os.path.abspath(workdir), STAGE)


def resolve_init(config, workdir):
  """config.init_from, 'auto' meaning the sft stage's model."""
  return stage_io.resolve_auto(config.init_from, workdir, "sft", "init_from", " to a model")


class Policy(NamedTuple):
  """The SFT policy on the mesh, and what sampling from it needs."""
  cfg: ModelConfig
  mesh: jax.sharding.Mesh
  params: dict
  tok: object
  init_from: str


def load_policy(config, workdir, cfg):
  """(the policy of `config.init_from` placed on `config.mesh`, the TFDS dir of the prompts)."""
  mesh = sharding.make_mesh(config.mesh)
  rollout.batch_size_check(config.batch_size, mesh, "batch_size")
  tfds_dir, data_tok_dir = stage_io.data_paths(config, workdir)
  init_from = resolve_init(config, workdir)
  params, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from", mesh)
  tok, _ = stage_io.load_tokenizer_for(config, model_tok_dir, data_tok_dir, cfg)
  return Policy(cfg, mesh, params, tok, init_from), tfds_dir


def split_records(config, tfds_dir):
  """{split: prompt records}: the train split, then the validation split."""
  return {config.data.train_split: rollout.split_prompts(
              tfds_dir, config.data.train_split, "train_split", config.num_train_prompts),
          config.data.eval_split: rollout.split_prompts(
              tfds_dir, config.data.eval_split, "eval_split", config.num_eval_prompts)}


def sample_split(policy: Policy, records, config, sc, rng, bar):
  """max_k samples per prompt: (texts, ids, ended (N, K), token counts), texts and ids grouped
  per prompt (ids: the sampled token ids without EOS, what the reward model trains on)."""
  bs, k, tok = config.batch_size, config.max_k, policy.tok
  texts, ids, ended, counts = [], [], [], []
  for b, batch in enumerate(rollout.prompt_batches(records, tok, bs, config.prompt_len)):
    out = rollout.sample_batch(policy.params, policy.cfg, batch, policy.mesh, bs,
                               jax.random.fold_in(rng, b), sc, k)
    rows = np.repeat(batch["index"] >= 0, k)
    t, e = rollout.decode_responses(tok, out["tokens"][rows], out["lengths"][rows])
    texts.extend(t)
    ids.extend(rollout.response_ids(row, int(n), tok.eos_id)
               for row, n in zip(out["tokens"][rows], out["lengths"][rows]))
    ended.append(e)
    counts.append(out["lengths"][rows] - e)
    bar.update(1)
  n = len(records)
  group = lambda xs: [xs[i * k:(i + 1) * k] for i in range(n)]
  return group(texts), group(ids), np.concatenate(ended).reshape(n, k), np.concatenate(counts)


def sample_splits(policy: Policy, records, config, out_dir):
  """{split: `sample_split`} over `records` in order, split `code` (0 train, 1 validation)
  sampled with the rng fold_in(key(config.seed), code)."""
  cfg, tok = policy.cfg, policy.tok
  sc = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=float(config.temperature),
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  print(f"{STAGE}: {cfg.flavour} {cfg.num_layers}x{cfg.d_model} from {policy.init_from}, "
        f"{' + '.join(f'{len(r)} {s}' for s, r in records.items())} prompts x {config.max_k} "
        f"samples (K in {config.min_k}..{config.max_k}), temperature {config.temperature}; "
        f"writing {out_dir}", flush=True)
  total = sum(-(-len(r) // config.batch_size) for r in records.values())
  bar = rollout.progress(total, STAGE)
  key = jax.random.key(config.seed)
  sampled = {}
  try:
    for code, split in enumerate(records):
      sampled[split] = sample_split(policy, records[split], config, sc,
                                    jax.random.fold_in(key, code), bar)
  finally:
    bar.close()
  return sampled


def label_split(config, code, split, records, sampled, score_fn, init_from):
  """(comparison records, collect.json's stats) of one sampled split: the labeler's rankings,
  each record with the ids the policy sampled and whether each response ended."""
  prompts = [r["prompt"] for r in records]
  texts, ids, ended, counts = sampled
  recs, kept = label_prompts(prompts, texts, score_fn, seed=config.seed, split_code=code,
                             min_k=config.min_k, max_k=config.max_k,
                             temperature=float(config.labeler_temperature))
  for record, i in zip(recs, kept):   # the ids the policy sampled, and whether each ended
    k = len(record["responses"])
    record["response_ids"] = [list(r) for r in ids[i][:k]]
    record["ended"] = [bool(e) for e in ended[i][:k]]
  if not recs:
    raise UserError(f"{STAGE}: all {len(prompts)} prompts of split {split!r} got responses the "
                    f"labeler cannot tell apart (all ties); the policy at {init_from} is not "
                    "ready (train SFT longer or raise config.temperature)")
  return recs, split_stats(prompts, texts, ended.reshape(-1), recs, score_fn,
                           config.max_new_tokens, counts)


def label_splits(config, records, sampled, score_fn, init_from):
  """(comparisons {split: records}, collect.json's stats) of every sampled split."""
  stats = {"stage": STAGE, "init_from": init_from, "min_k": config.min_k, "max_k": config.max_k,
           "temperature": float(config.temperature),
           "labeler_temperature": float(config.labeler_temperature),
           "max_new_tokens": config.max_new_tokens, "prompt_len": config.prompt_len,
           "seed": config.seed, "splits": {}}
  comparisons = {}
  for code, split in enumerate(records):
    comparisons[split], stats["splits"][split] = label_split(
        config, code, split, records[split], sampled[split], score_fn, init_from)
  all_prompts = sum(s["prompts"] for s in stats["splits"].values())
  stats["mean_gold_score"] = float(sum(s["mean_gold_score"] * s["prompts"]
                                       for s in stats["splits"].values()) / all_prompts)
  stats["dropped_fraction"] = float(sum(s["dropped_all_ties"]
                                        for s in stats["splits"].values()) / all_prompts)
  return comparisons, stats


def write_outputs(workdir, out_dir, comparisons, stats, sample_seconds, t0):
  """The JSONL records, their TFDS dataset and collect.json (last, with the seconds since `t0`),
  written in `<workdir>/.collect.partial` and renamed to `out_dir` (process 0 only)."""
  partial = os.path.join(workdir, f".{STAGE}.partial")
  if os.path.exists(partial):
    shutil.rmtree(partial)
  os.makedirs(partial)
  files = {}
  for split, recs in comparisons.items():
    files[split] = os.path.join(partial, f"comparisons_{split}.jsonl")
    schema.write_jsonl(files[split], recs, schema.COMPARISONS)
  builders.build_dataset(schema.COMPARISONS, files, os.path.join(partial, "tfds"))
  stats["sample_seconds"] = sample_seconds
  stats["seconds"] = time.time() - t0
  with open(os.path.join(partial, DONE_FILE), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2, sort_keys=True)
  if os.path.exists(out_dir):   # a directory without the marker: never finished
    shutil.rmtree(out_dir)
  os.rename(partial, out_dir)


def print_summary(stats, out_dir, seconds):
  """What each split gave, and where it went."""
  for split, s in stats["splits"].items():
    print(f"{STAGE}: {split}: {s['records']} comparisons from {s['prompts']} prompts "
          f"({s['dropped_fraction']:.1%} dropped as all-ties), mean K {s['mean_k']:.2f}, "
          f"mean gold score of SFT samples {s['mean_gold_score']:.4f}", flush=True)
  print(f"{STAGE}: written to {out_dir} in {seconds:.1f} s", flush=True)


def run(config, workdir, score_fn=None):
  """Runs the collect stage in `<workdir>/collect`; returns that directory.

  Skipped (with a line) when `collect/collect.json` exists. `score_fn(prompt, response)` is the
  gold labeler (default `gold_labeler.gold_score`).
  """
  workdir = os.path.abspath(workdir)
  out_dir = collect_dir(workdir)
  if os.path.exists(os.path.join(out_dir, DONE_FILE)):
    print(f"{STAGE}: comparisons exist at {out_dir}; skipping the stage", flush=True)
    return out_dir
  cfg = validate(config)
  score_fn = score_fn or gold_labeler.gold_score
  t0 = time.time()
  policy, tfds_dir = load_policy(config, workdir, cfg)
  records = split_records(config, tfds_dir)
  sampled = sample_splits(policy, records, config, out_dir)
  sample_seconds = time.time() - t0
  comparisons, stats = label_splits(config, records, sampled, score_fn, policy.init_from)
  if jax.process_index() == 0:
    write_outputs(workdir, out_dir, comparisons, stats, sample_seconds, t0)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("rlhf_jax_collect_done")
  print_summary(stats, out_dir, time.time() - t0)
  return out_dir
