"""The offline task's data set: sizes, held-out split, seeded records of every kind, files."""
import dataclasses
import json
import os
import zlib

import numpy as np

from rlhf_jax.data import gold_labeler
from rlhf_jax.data import labelers
from rlhf_jax.data import offline_task
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class OfflineSizes:
  """How many records of each kind to generate, and how the comparisons are made."""
  ptx: int = 4000
  sft: int = 8000              # demonstrations (at 2000, 1000 SFT steps overfit them: 8 epochs)
  comparisons: int = 1000
  prompts: int = 10000         # RL prompts: the collect stage ranks SFT samples of each
  validation: int = 400        # records in each validation split
  held_out_fraction: float = 0.1  # share of the prompt space (by a hash) kept for validation
  probe: int = 200             # capability-probe prompts (probe_validation.jsonl)
  min_k: int = 4               # responses per comparison, drawn in min_k..max_k
  max_k: int = 6
  max_edits: int = 3           # candidate responses carry 0..max_edits mistakes
  labeler_temperature: float = 0.1

  def validate(self):
    """Raises a UserError naming the first bad size."""
    for field in ("ptx", "sft", "comparisons", "prompts", "validation", "probe"):
      if getattr(self, field) < 1:
        raise UserError(f"offline task: {field} size must be >= 1 (got {getattr(self, field)})")
    if not 0 < self.held_out_fraction < 1:
      raise UserError(f"offline task: held_out_fraction must be in (0, 1) "
                      f"(got {self.held_out_fraction})")
    if not schema.MIN_K <= self.min_k <= self.max_k <= schema.MAX_K:
      raise UserError(f"offline task: need {schema.MIN_K} <= min_k <= max_k <= {schema.MAX_K} "
                      f"(got {self.min_k}, {self.max_k})")
    return self


def config_fields():
  """{field: default} of every knob of the task and its sizes: `config.data.task.*`."""
  return {**dataclasses.asdict(offline_task.TaskConfig()), **dataclasses.asdict(OfflineSizes())}


def from_config(task):
  """(TaskConfig, OfflineSizes) from `config.data.task` (a mapping of `config_fields()`), checked
  field by field: a UserError names `config.data.task.<field>` and what was expected."""
  defaults = config_fields()
  task = dict(task)
  for field in task:
    if field not in defaults:
      raise UserError(f"config.data.task.{field}: unknown field (expected some of "
                      f"{', '.join(defaults)})")
  values = {**defaults, **task}
  for field, default in defaults.items():
    value = values[field]
    if field == "families":
      if isinstance(value, str):
        value = (value,)
      if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"config.data.task.families must be a list of family names, got "
                        f"{value!r}")
      # --config.data.task.families=sort,count arrives as ('sort,count',)
      values[field] = tuple(f.strip() for v in value for f in v.split(",") if f.strip())
    elif isinstance(default, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config.data.task.{field} must be a number, got {value!r}")
      values[field] = float(value)
    elif isinstance(value, bool) or not isinstance(value, int):
      raise UserError(f"config.data.task.{field} must be an integer, got {value!r}")
  config = offline_task.TaskConfig(
      **{k: values[k] for k in dataclasses.asdict(offline_task.TaskConfig())})
  sizes = OfflineSizes(**{k: values[k] for k in dataclasses.asdict(OfflineSizes())})
  try:
    config.validate()
    sizes.validate()
  except UserError as e:
    raise UserError(f"config.data.task: {e}".replace("offline task: ", "")) from None
  return config, sizes


_STREAMS = {"sft": 2, "comparisons": 3, "prompts": 4, "ptx": 5, "labeler": 6,
            "probe": 7}


def _rng(seed, stream, split):
  return np.random.default_rng([seed, _STREAMS[stream], 0 if split == "train" else 1])


def held_out(prompt, seed, fraction):
  """Whether `prompt` belongs to the validation side of the prompt space: a hash of (seed, prompt)
  below `fraction`. Splitting the space (not the draws) keeps every family's share the same in
  both splits, however few distinct prompts a family has (add: 2 x 11 x 11)."""
  return zlib.crc32(f"{seed}\x00{prompt}".encode()) < fraction * 2 ** 32


def _draw_prompts(config, rng, count, seed, fraction, validation):
  """`count` instructions from one side of the held-out split (repeats allowed)."""
  drawn = []
  for _ in range(100 * count + 1000):
    family, args, phrasing = offline_task.sample_instruction(config, rng)
    prompt = offline_task.make_prompt(family, args, phrasing)
    if held_out(prompt, seed, fraction) == validation:
      drawn.append((prompt, family, args))
      if len(drawn) == count:
        return drawn
  raise UserError(f"offline task: the task config is too small to draw {count} "
                  f"{'validation' if validation else 'training'} prompts (raise num_words, "
                  "max_items or max_operand)")


def _comparison_records(config, sizes, instructions, rng):
  records = []
  while len(records) < len(instructions):
    prompt, family, args = instructions[len(records)]
    k = int(rng.integers(sizes.min_k, sizes.max_k + 1))
    candidates = [offline_task.candidate_response(family, args, config, rng,
                                     int(rng.integers(sizes.max_edits + 1))) for _ in range(k)]
    records.extend(labelers.label_comparisons([prompt], [candidates], gold_labeler.gold_score, rng,
                                              sizes.labeler_temperature))
  return records


def make_records(config=offline_task.TaskConfig(), sizes=OfflineSizes(), seed=0):
  """All records of the offline task: {kind: {split: records}}, splits 'train' and 'validation'.

  Validation prompts never occur in any training split (`held_out` splits the prompt space, so
  both splits have the same mix of families). Validation demonstrations are correct;
  training ones carry the flaws of `offline_task.demonstration`.
  """
  config.validate()
  sizes.validate()
  draw = lambda kind, split, count: _draw_prompts(
      config, _rng(seed, kind, split), count, seed, sizes.held_out_fraction, split != "train")
  kinds = ("sft", "comparisons", "prompts")
  validation = {kind: draw(kind, "validation", sizes.validation) for kind in kinds}
  train = {kind: draw(kind, "train", getattr(sizes, kind)) for kind in kinds}
  records = {schema.PTX: {}, schema.SFT: {}, schema.COMPARISONS: {}, schema.PROMPTS: {}}
  for split, drawn, ptx_count in (("train", train, sizes.ptx),
                                  ("validation", validation, sizes.validation)):
    rng = _rng(seed, "sft", split)
    records[schema.SFT][split] = [
        {"prompt": p,
         "response": offline_task.demonstration(f, a, config, rng, flawed=split == "train")}
        for p, f, a in drawn["sft"]]
    records[schema.COMPARISONS][split] = _comparison_records(
        config, sizes, drawn["comparisons"], _rng(seed, "labeler", split))
    records[schema.PROMPTS][split] = [{"prompt": p} for p, _, _ in drawn["prompts"]]
    rng = _rng(seed, "ptx", split)
    records[schema.PTX][split] = [{"text": offline_task.ptx_document(config, rng)}
                                  for _ in range(ptx_count)]
  return records


def probe_records(config=offline_task.TaskConfig(), sizes=OfflineSizes(), seed=0):
  """The capability probe: [{'prompt': 'the list ... has'}] (`sizes.probe` of them)."""
  rng = _rng(seed, "probe", "validation")
  return [{"prompt": offline_task.probe_prompt(config, rng)} for _ in range(sizes.probe)]


PROBE_FILE = "probe_validation.jsonl"


def read_probe(data_dir):
  """The probe prompts written next to the task's files, or None when there are none."""
  path = os.path.join(os.fspath(data_dir), PROBE_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["prompt"] for line in f if line.strip()]


def tokenizer_corpus(records):
  """The training texts of every kind, in a fixed order (what the offline tokenizer learns)."""
  texts = [r["text"] for r in records[schema.PTX]["train"]]
  texts += [r["prompt"] + r["response"] for r in records[schema.SFT]["train"]]
  for r in records[schema.COMPARISONS]["train"]:
    texts += [r["prompt"] + response for response in r["responses"]]
  texts += [r["prompt"] for r in records[schema.PROMPTS]["train"]]
  return texts


def check_prepared(out_dir, config, sizes, seed):
  """UserError when the task in `out_dir` was generated with other knobs, sizes or seed than
  asked for (a run must not silently train on another task than its config says)."""
  path = os.path.join(os.fspath(out_dir), "offline_task.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    found = json.load(f)
  wanted = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sizes),
            "seed": seed}
  for part in ("config", "sizes"):
    for field, value in wanted[part].items():
      old = found.get(part, {}).get(field)
      if (list(value) if isinstance(value, tuple) else value) != old:
        raise UserError(f"config.data.task.{field}: the offline task in {out_dir} was generated "
                        f"with {old!r}, not {value!r}; use another --workdir (or data.dir)")
  if found.get("seed") != seed:
    raise UserError(f"config.data.task_seed: the offline task in {out_dir} was generated with "
                    f"seed {found.get('seed')!r}, not {seed!r}; use another --workdir")


def write_offline_task(out_dir, config=offline_task.TaskConfig(), sizes=OfflineSizes(), seed=0,
                       vocab_size=512):
  """Writes the offline task's JSONL files and its tokenizer under `out_dir`.

  Layout: `{kind}_{split}.jsonl` for the four kinds and splits train/validation,
  `probe_validation.jsonl` (the capability probe's prompts), `tokenizer/`
  (a Hugging Face tokenizer directory, byte-level BPE with <pad>=0, <bos>=1, <eos>=2) and
  `offline_task.json` (the config, sizes and seed). The same arguments give bit-for-bit the same
  files.

  Returns:
    {'tokenizer': path, kind: {split: path}} for the four kinds.
  """
  out_dir = os.fspath(out_dir)
  records = make_records(config, sizes, seed)
  paths = {}
  for kind, splits in records.items():
    paths[kind] = {}
    for split, split_records in splits.items():
      path = os.path.join(out_dir, f"{kind}_{split}.jsonl")
      schema.write_jsonl(path, split_records, kind)
      paths[kind][split] = path
  paths["probe"] = os.path.join(out_dir, PROBE_FILE)
  with open(paths["probe"], "w", encoding="utf-8") as f:
    for record in probe_records(config, sizes, seed):
      f.write(json.dumps(record) + "\n")
  paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
  tokenizer_lib.train_byte_bpe(tokenizer_corpus(records), paths["tokenizer"], vocab_size)
  description = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sizes),
                 "seed": seed, "vocab_size": vocab_size}
  with open(os.path.join(out_dir, "offline_task.json"), "w", encoding="utf-8") as f:
    json.dump(description, f, indent=2, sort_keys=True)
  return paths
