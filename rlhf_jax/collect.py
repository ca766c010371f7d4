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
import sys
import time

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, abstract_params
from rlhf_jax.train import stage_io

DONE_FILE = "collect.json"
STAGE = "collect"


# ----------------------------------------------------------------------------- shared with evaluate

def text_of(value):
  """TFDS text (bytes) or str -> str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def place_params(params, cfg: ModelConfig, head, mesh):
  """Host (or device) parameters placed on `mesh` by the logical-axis rule table."""
  shardings = sharding.param_shardings(abstract_params(cfg, head, boxed=True), mesh)
  return jax.device_put(params, shardings)


def to_host(tree, mesh):
  """Device arrays -> numpy; with several processes they are gathered (replicated) first."""
  if jax.process_count() > 1:
    tree = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(tree)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def batch_size_check(batch_size, mesh, field):
  try:
    sharding.check_batch_size(batch_size, mesh, field)
  except UserError as e:
    raise UserError(f"config.{e}") from None


def prompt_batches(records, tok, batch_size, prompt_len):
  """Fixed-shape host batches of left-padded prompts `pad... [bos] prompt` over `records` in order.

  Yields dicts tokens, segment_ids (batch_size, prompt_len) and index (batch_size,), the record
  index (-1 on the padding rows of the last batch).
  """
  from rlhf_jax.data import loaders  # pylint: disable=g-import-not-at-top
  return loaders.prompt_loader(records, tok, batch_size=batch_size, prompt_len=prompt_len,
                               num_epochs=1, shuffle=False, drop_remainder=False, shard=(0, 1))


def global_rows(batch, mesh, batch_size):
  """A full host batch (every process holds all rows) -> global arrays sharded over the batch."""
  rows = sharding.process_batch_rows(mesh, batch_size)
  return sharding.global_batch({k: batch[k][rows] for k in ("tokens", "segment_ids")}, mesh,
                               batch_size)


def sample_batch(params, cfg, batch, mesh, batch_size, rng, sc, num_samples):
  """K samples per prompt of one host prompt batch; numpy tokens, mask, lengths (B*K, ...)."""
  from rlhf_jax.sampling import sample  # pylint: disable=g-import-not-at-top
  prompts = global_rows(batch, mesh, batch_size)
  with sharding.activate(mesh):
    out = sample(params, cfg, prompts["tokens"], prompts["segment_ids"], rng, sc,
                 num_samples=num_samples)
  return to_host({"tokens": out.tokens, "mask": out.mask, "lengths": out.lengths}, mesh)


def response_ids(tokens, length, eos_id):
  """The generated ids of one row without its EOS: tokens[:length], the last dropped if EOS."""
  ids = [int(t) for t in tokens[:length]]
  if ids and ids[-1] == eos_id:
    ids = ids[:-1]
  return ids


def decode_responses(tok, tokens, lengths):
  """Texts of the generated rows (cut at EOS) and whether each row ended with EOS."""
  texts, ended = [], []
  for row, length in zip(tokens, lengths):
    ids = response_ids(row, int(length), tok.eos_id)
    ended.append(int(length) > 0 and int(row[int(length) - 1]) == tok.eos_id)
    texts.append(tok.decode(ids))
  return texts, np.asarray(ended)


def progress(total, desc):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr,
              disable=jax.process_index() != 0, mininterval=1.0)


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
  from rlhf_jax.data import schema  # pylint: disable=g-import-not-at-top
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
  from rlhf_jax.data import labelers  # pylint: disable=g-import-not-at-top
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


def split_prompts(tfds_dir, split, field, limit):
  """The first `limit` (0 = all) prompt records of one split, as dicts."""
  source = stage_io.load_split(tfds_dir, "prompts", split, field)
  n = len(source) if not limit else min(limit, len(source))
  return [{"prompt": text_of(source[i]["prompt"])} for i in range(n)]


def sample_split(params, cfg, mesh, tok, records, config, sc, rng, bar):
  """max_k samples per prompt: (texts, ids, ended (N, K), token counts), texts and ids grouped
  per prompt (ids: the sampled token ids without EOS, what the reward model trains on)."""
  bs, k = config.batch_size, config.max_k
  texts, ids, ended, counts = [], [], [], []
  for b, batch in enumerate(prompt_batches(records, tok, bs, config.prompt_len)):
    out = sample_batch(params, cfg, batch, mesh, bs, jax.random.fold_in(rng, b), sc, k)
    rows = np.repeat(batch["index"] >= 0, k)
    t, e = decode_responses(tok, out["tokens"][rows], out["lengths"][rows])
    texts.extend(t)
    ids.extend(response_ids(row, int(n), tok.eos_id)
               for row, n in zip(out["tokens"][rows], out["lengths"][rows]))
    ended.append(e)
    counts.append(out["lengths"][rows] - e)
    bar.update(1)
  n = len(records)
  group = lambda xs: [xs[i * k:(i + 1) * k] for i in range(n)]
  return group(texts), group(ids), np.concatenate(ended).reshape(n, k), np.concatenate(counts)


def run(config, workdir, score_fn=None):
  """Runs the collect stage in `<workdir>/collect`; returns that directory.

  Skipped (with a line) when `collect/collect.json` exists. `score_fn(prompt, response)` is the
  gold labeler (default `offline_task.gold_score`).
  """
  from rlhf_jax.data import builders, offline_task, schema  # pylint: disable=g-import-not-at-top
  from rlhf_jax.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  out_dir = collect_dir(workdir)
  if os.path.exists(os.path.join(out_dir, DONE_FILE)):
    print(f"{STAGE}: comparisons exist at {out_dir}; skipping the stage", flush=True)
    return out_dir
  cfg = validate(config)
  score_fn = score_fn or offline_task.gold_score
  t0 = time.time()
  mesh = sharding.make_mesh(config.mesh)
  batch_size_check(config.batch_size, mesh, "batch_size")
  tfds_dir, data_tok_dir = stage_io.data_paths(config, workdir)
  init_from = resolve_init(config, workdir)
  lm_params, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from")
  tok, _ = stage_io.load_tokenizer_for(config, model_tok_dir, data_tok_dir, cfg)
  params = place_params(lm_params, cfg, "lm", mesh)
  del lm_params
  splits = (config.data.train_split, config.data.eval_split)
  records = {splits[0]: split_prompts(tfds_dir, splits[0], "train_split",
                                       config.num_train_prompts),
             splits[1]: split_prompts(tfds_dir, splits[1], "eval_split",
                                       config.num_eval_prompts)}
  sc = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=float(config.temperature),
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  print(f"{STAGE}: {cfg.flavour} {cfg.num_layers}x{cfg.d_model} from {init_from}, "
        f"{' + '.join(f'{len(r)} {s}' for s, r in records.items())} prompts x {config.max_k} "
        f"samples (K in {config.min_k}..{config.max_k}), temperature {config.temperature}; "
        f"writing {out_dir}", flush=True)
  total = sum(-(-len(r) // config.batch_size) for r in records.values())
  bar = progress(total, STAGE)
  key = jax.random.key(config.seed)
  sampled = {}
  try:
    for code, split in enumerate(splits):
      sampled[split] = sample_split(params, cfg, mesh, tok, records[split], config, sc,
                                    jax.random.fold_in(key, code), bar)
  finally:
    bar.close()
  sample_seconds = time.time() - t0

  stats = {"stage": STAGE, "init_from": init_from, "min_k": config.min_k, "max_k": config.max_k,
           "temperature": float(config.temperature),
           "labeler_temperature": float(config.labeler_temperature),
           "max_new_tokens": config.max_new_tokens, "prompt_len": config.prompt_len,
           "seed": config.seed, "splits": {}}
  comparisons = {}
  for code, split in enumerate(splits):
    prompts = [r["prompt"] for r in records[split]]
    texts, ids, ended, counts = sampled[split]
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
    comparisons[split] = recs
    stats["splits"][split] = split_stats(prompts, texts, ended.reshape(-1), recs, score_fn,
                                         config.max_new_tokens, counts)
  all_prompts = sum(s["prompts"] for s in stats["splits"].values())
  stats["mean_gold_score"] = float(sum(s["mean_gold_score"] * s["prompts"]
                                       for s in stats["splits"].values()) / all_prompts)
  stats["dropped_fraction"] = float(sum(s["dropped_all_ties"]
                                        for s in stats["splits"].values()) / all_prompts)

  if jax.process_index() == 0:
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
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("rlhf_jax_collect_done")
  for split, s in stats["splits"].items():
    print(f"{STAGE}: {split}: {s['records']} comparisons from {s['prompts']} prompts "
          f"({s['dropped_fraction']:.1%} dropped as all-ties), mean K {s['mean_k']:.2f}, "
          f"mean gold score of SFT samples {s['mean_gold_score']:.4f}", flush=True)
  print(f"{STAGE}: written to {out_dir} in {time.time() - t0:.1f} s", flush=True)
  return out_dir
