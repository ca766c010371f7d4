"""Real preference data from the public files as distributed: Anthropic HH-RLHF and OpenAI's
summarize-from-feedback (TL;DR), prepared for the pipeline under `<workdir>/data` on first use.

`config.data` of a real-data run (configs/hh_rlhf.py, configs/tldr.py):

  source            'hh_rlhf' or 'tldr'
  input             the comparisons file: HH-RLHF `train.jsonl.gz`, or TL;DR comparisons JSON lines
                    (plain or gzip, told by the first bytes, not the name)
  heldout           '' = hold out `heldout_fraction` of the input's prompts; else a comparisons
                    file of the same format used as the held-out split (e.g. HH `test.jsonl.gz`)
  heldout_fraction  share of the prompt space held out (a hash of the prompt text)
  sft               '' = the preferred response of every comparison; else a demonstrations file
                    (the TL;DR SFT split, or sft JSONL {"prompt", "response"})
  ptx               '' = no pretraining text (PPO-ptx then needs ppo.ptx_coef 0); else a text
                    file (documents separated by blank lines) or JSON lines with a "text" field
                    (.jsonl / .json, optionally .gz)
  limit             use only the first `limit` usable comparisons of `input` (0 = all)

The held-out split is by prompt: a prompt is held out when the first 4 bytes of the sha256 of its
text, read as an integer, fall below `heldout_fraction` of 2^32, so every record of one prompt
lands on the same side, in every kind (comparisons, sft, prompts). (CRC-32, which the offline task
uses, is linear: prompts that differ in a few words, like the templated TL;DR posts of a fixture,
land on one side far more often than the fraction says.) With a `heldout` file,
its records whose prompt also occurs in the training data are dropped (counted). Every train
split then loses the records whose prompt is held out anywhere: no prompt is in both splits. Each
side keeps at least one prompt (on tiny data the prompt with the lowest / highest hash moves over).
Pretraining documents are split the same way by their text.

What was prepared, from which files (sha256) and with which settings is `real_data.json`; a
later stage (or run) with other files or settings is refused with a one-line error. Every record
is read and checked before anything is written, and the folder appears by a rename: bad input
leaves nothing behind.
"""
import hashlib
import json
import os
import shutil

from rlhf_jax import distributed
from rlhf_jax.data import builders
from rlhf_jax.data import formats
from rlhf_jax.data import schema
from rlhf_jax.errors import UserError

SOURCES = ("hh_rlhf", "tldr")
DONE_FILE = "real_data.json"
FILE_FIELDS = ("input", "heldout", "sft", "ptx")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def check_config(config):
  """One-line UserError for the first bad real-data field of `config.data` (or a stage setting
  the data cannot serve: PPO-ptx without pretraining text)."""
  data = config.data
  for field in ("input", "heldout", "heldout_fraction", "sft", "ptx", "limit"):
    if field not in data:
      raise UserError(f"config.data.{field} is missing (source {data.source!r}; see "
                      f"configs/{data.source}.py)")
  if not data.input:
    raise UserError(f"config.data.input: the {data.source} comparisons file is required "
                    f"(e.g. --config.data.input=train.jsonl.gz)")
  for field in FILE_FIELDS:
    path = data[field]
    if path and not os.path.isfile(path):
      raise UserError(f"config.data.{field}: {path} is not a file")
  fraction = data.heldout_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise UserError(f"config.data.heldout_fraction must be a number in (0, 1), got {fraction!r}")
  limit = data.limit
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise UserError(f"config.data.limit must be an integer >= 0 (0 = all), got {limit!r}")
  if config.get("stage") == "ppo" and config.ppo.ptx_coef and not data.ptx:
    raise UserError("config.data.ptx: PPO-ptx (config.ppo.ptx_coef > 0) needs pretraining text; "
                    "give a text or JSONL file, or set config.ppo.ptx_coef=0 (plain PPO)")


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def settings_of(data):
  """What decides the prepared data: the source, each file's sha256 and the split settings."""
  out = {"source": data.source, "heldout_fraction": float(data.heldout_fraction),
         "limit": int(data.limit)}
  for field in FILE_FIELDS:
    out[field] = _sha256(data[field]) if data[field] else None
  return out


def _describe(field, value):
  if field not in FILE_FIELDS:
    return f"with {field} {value!r}"
  return "without a file" if value is None else f"from the file of sha256 {value[:12]}..."


def check_prepared(out_dir, settings, flag=lambda field: f"config.data.{field}"):
  """UserError when `out_dir` holds data prepared from other files or settings; `flag(field)`
  names the setting in the message."""
  path = os.path.join(out_dir, DONE_FILE)
  if not os.path.exists(path):
    raise UserError(f"{flag('input')}: {out_dir} holds prepared data but no {DONE_FILE}: they "
                    "were not made from these files; use another --workdir (or data.dir)")
  with open(path, encoding="utf-8") as f:
    found = json.load(f).get("settings", {})
  for field, value in settings.items():
    if found.get(field) != value:
      raise UserError(f"{flag(field)}: the data in {out_dir} were prepared "
                      f"{_describe(field, found.get(field))}, not {_describe(field, value)}; use "
                      "another --workdir (or config.data.dir)")


def _hash(text):
  """The held-out hash of a prompt or document: sha256's first 4 bytes, big-endian, in [0, 2^32)."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def held_out_keys(keys, fraction):
  """The set of `keys` (prompts, documents) on the held-out side: hash below `fraction` of the
  space; when that leaves a side empty (and there are two keys or more) the key with the lowest
  (highest) hash moves over, so both sides keep one."""
  keys = set(keys)
  held = {k for k in keys if _hash(k) < fraction * 2 ** 32}
  if not held and len(keys) > 1:
    held = {min(keys, key=_hash)}
  if held == keys and len(keys) > 1:
    held = held - {max(keys, key=_hash)}
  return held


def _split(records, key, held):
  """(train, validation) records of `records` by whether key(record) is in `held`."""
  return ([r for r in records if key(r) not in held], [r for r in records if key(r) in held])


def read_ptx(path):
  """Pretraining documents of a text or JSONL file (plain or gzip): JSON lines when the name ends
  in .jsonl/.json(.gz), each record's "text" (other fields ignored); else plain text, documents
  separated by blank lines."""
  docs = []
  if os.path.basename(path).lower().endswith(JSONL_SUFFIXES):
    for where, record in schema.json_lines(path, "pretraining text"):
      text = formats._field(where, record, "text")  # pylint: disable=protected-access
      if text.strip():
        docs.append(text)
  else:
    lines = []
    for _, line in schema.text_lines(path, "pretraining text"):
      if line.strip():
        lines.append(line)
      elif lines:
        docs.append("".join(lines).strip("\n"))
        lines = []
    if lines:
      docs.append("".join(lines).strip("\n"))
  if len(docs) < 2:
    raise UserError(f"config.data.ptx: {path} holds {len(docs)} document(s); expected at least 2 "
                    "(documents separated by blank lines, or JSON lines with a \"text\" field)")
  return docs


def _comparisons(data):
  """Train and held-out comparisons of `data.input` (and `data.heldout`), and skipped counts."""
  convert = formats.CONVERTERS[data.source]
  records, skipped = convert(data.input)
  if data.limit:
    records = records[:data.limit]
  if not data.heldout:
    held = held_out_keys([r["prompt"] for r in records], data.heldout_fraction)
    return _split(records, lambda r: r["prompt"], held), skipped
  heldout, heldout_skipped = convert(data.heldout)
  train_prompts = {r["prompt"] for r in records}
  kept = [r for r in heldout if r["prompt"] not in train_prompts]
  skipped = {**skipped, **{f"heldout: {k}": n for k, n in heldout_skipped.items()},
             "heldout: prompt also in the input": len(heldout) - len(kept)}
  if not kept:
    raise UserError(f"config.data.heldout: every prompt of {data.heldout} also occurs in "
                    f"{data.input}; expected held-out prompts")
  return (records, kept), skipped


def make_records(data):
  """({kind: {split: records}}, {reason: skipped count}) of the real data described by `data`
  (see the module docstring), every split non-empty and no prompt in both splits."""
  (comp_train, comp_val), skipped = _comparisons(data)
  if data.sft:
    demos, sft_skipped = formats.convert_demonstrations(data.sft)
    skipped.update({f"sft: {k}": n for k, n in sft_skipped.items()})
    held = held_out_keys([r["prompt"] for r in demos], data.heldout_fraction)
    sft_train, sft_val = _split(demos, lambda r: r["prompt"], held)
  else:
    sft_train = formats.best_demonstrations(comp_train)
    sft_val = formats.best_demonstrations(comp_val)
  held = {r["prompt"] for r in comp_val + sft_val}
  prompt_of = lambda r: r["prompt"]
  comp_train, sft_train = (_split(comp_train, prompt_of, held)[0],
                           _split(sft_train, prompt_of, held)[0])
  out = {schema.COMPARISONS: {"train": comp_train, "validation": comp_val},
         schema.SFT: {"train": sft_train, "validation": sft_val},
         schema.PROMPTS: {"train": formats.unique_prompts(sft_train + comp_train),
                          "validation": formats.unique_prompts(comp_val + sft_val)}}
  if data.ptx:
    docs = read_ptx(data.ptx)
    held_docs = held_out_keys(docs, data.heldout_fraction)
    train, val = _split([{"text": d} for d in docs], lambda r: r["text"], held_docs)
    out[schema.PTX] = {"train": train, "validation": val}
  for kind, splits in out.items():
    for split, records in splits.items():
      if not records:
        raise UserError(f"config.data.heldout_fraction: the {split} split of the {kind} records "
                        f"is empty (too few distinct prompts in {data.input}); give more data "
                        "or config.data.heldout")
  return out, skipped


def prepare(data, out_dir, settings):
  """Reads and checks every record, then writes `out_dir` (`{kind}_{split}.jsonl`, `tfds/`,
  `real_data.json`) through `<out_dir>.partial` and a rename. Returns the counts."""
  records, skipped = make_records(data)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"config.data.dir: {out_dir} is not empty but holds no prepared data "
                    "(no tfds/); expected a new or empty folder")
  partial = out_dir.rstrip(os.sep) + ".partial"
  if os.path.exists(partial):
    shutil.rmtree(partial)
  files = {}
  for kind, splits in records.items():
    files[kind] = {}
    for split, recs in splits.items():
      files[kind][split] = os.path.join(partial, f"{kind}_{split}.jsonl")
      schema.write_jsonl(files[kind][split], recs, kind)
  builders.build_datasets(files, os.path.join(partial, "tfds"))
  counts = {kind: {split: len(r) for split, r in splits.items()}
            for kind, splits in records.items()}
  meta = {"settings": settings, "counts": counts, "skipped": skipped,
          "files": {f: os.path.abspath(data[f]) if data[f] else None for f in FILE_FIELDS}}
  with open(os.path.join(partial, DONE_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(partial, out_dir)
  return counts, skipped


def prepared_tfds_dir(data, out_dir):
  """The TFDS dir of the real data in `out_dir`, prepared there by process 0 when missing (the
  others wait), else checked to come from the same files and settings."""
  settings = settings_of(data)
  tfds_dir = os.path.join(out_dir, "tfds")
  missing = not os.path.isdir(tfds_dir)
  distributed.barrier("rlhf_jax_real_data_check")    # every process looked before any writes
  if missing:
    if distributed.is_primary():
      print(f"preparing {data.source} data from {data.input} in {out_dir}", flush=True)
      counts, skipped = prepare(data, out_dir, settings)
      shown = ", ".join(f"{k} {c['train']}/{c['validation']}" for k, c in counts.items())
      dropped = ", ".join(f"{n} {r}" for r, n in skipped.items() if n) or "none"
      print(f"prepared (train/validation records): {shown}; skipped: {dropped}", flush=True)
    distributed.barrier("rlhf_jax_real_data_prepared")
  else:
    check_prepared(out_dir, settings)
  return tfds_dir
