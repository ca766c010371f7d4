"""Prepare data sets: JSONL (ours, converted, or the generated offline task) -> TFDS array_record.

  python -m rlhf_jax.data.prepare --source=offline --out_dir=work/data
  python -m rlhf_jax.data.prepare --source=hh_rlhf --input=train.jsonl.gz \
      --heldout=test.jsonl.gz --ptx=wiki.txt --out_dir=work/hh
  python -m rlhf_jax.data.prepare --source=tldr --input=comparisons.jsonl \
      --sft=tldr_3_filtered/train.jsonl --out_dir=work/tldr
  python -m rlhf_jax.data.prepare --source=jsonl --kind=sft \\
      --input=train=a.jsonl,validation=b.jsonl --out_dir=work/mine

JSONL files land in `out_dir`, the TFDS datasets in `out_dir/tfds` (load them with
`builders.load_source(out_dir + "/tfds", kind, split)`). HH-RLHF and TL;DR files (plain or gzip)
get a train and a validation split by prompt and the ptx corpus of --ptx (`real_data`, the same
preparation `config.data.source=hh_rlhf|tldr` runs); train on them with
`--config.data.source=dir --config.data.dir=<out_dir>`. Bad input ends with a one-line error and
exit status 2.
"""
import os

import ml_collections

from rlhf_jax.data import builders
from rlhf_jax.data import formats
from rlhf_jax.data import offline_dataset
from rlhf_jax.data import offline_task
from rlhf_jax.data import real_data
from rlhf_jax.data import schema
from rlhf_jax.errors import UserError

SOURCES = ("offline", "hh_rlhf", "tldr", "jsonl")


def tfds_dir(out_dir):
  """Where `prepare_*` put the TFDS datasets of `out_dir`."""
  return os.path.join(os.fspath(out_dir), "tfds")


def prepare_offline(out_dir, config=offline_task.TaskConfig(),
                    sizes=offline_dataset.OfflineSizes(), seed=0, vocab_size=512, overwrite=False):
  """Writes the offline task (JSONL + tokenizer) and builds its four TFDS datasets.

  Returns the paths of `offline_dataset.write_offline_task`, plus 'tfds': the TFDS data_dir.
  """
  paths = offline_dataset.write_offline_task(out_dir, config, sizes, seed, vocab_size)
  builders.build_datasets({kind: paths[kind] for kind in schema.KINDS}, tfds_dir(out_dir),
                          overwrite)
  return dict(paths, tfds=tfds_dir(out_dir))


def prepare_public(source_format, src, out_dir, overwrite=False):
  """Converts an HH-RLHF or TL;DR file and builds comparisons, sft (best responses) and prompts.

  Each becomes the 'train' split. Returns ({kind: JSONL path} plus 'tfds', skipped counts).
  """
  paths, skipped = formats.convert_file(source_format, src, out_dir, source_format)
  builders.build_datasets({kind: {"train": path} for kind, path in paths.items()},
                          tfds_dir(out_dir), overwrite)
  return dict(paths, tfds=tfds_dir(out_dir)), skipped


def prepare_real(source, out_dir, input_path, heldout="", heldout_fraction=0.05, sft="", ptx="",
                 limit=0):
  """Prepares HH-RLHF / TL;DR files as `config.data.source=<source>` does (`real_data`), in
  `out_dir`; an `out_dir` prepared before from the same files and settings is reused.

  Returns ({kind: {split: records}} counts, or None when reused; skipped counts).
  """
  if not 0 < heldout_fraction < 1:
    raise UserError(f"--heldout_fraction must be in (0, 1), got {heldout_fraction}")
  data = ml_collections.ConfigDict(dict(source=source, input=input_path, heldout=heldout or "",
                                        heldout_fraction=heldout_fraction, sft=sft or "",
                                        ptx=ptx or "", limit=limit))
  for field in real_data.FILE_FIELDS:
    if data[field] and not os.path.isfile(data[field]):
      raise UserError(f"{data[field]}: no such file (--{field})")
  settings = real_data.settings_of(data)
  if os.path.isdir(tfds_dir(out_dir)):
    real_data.check_prepared(os.fspath(out_dir), settings, lambda field: f"--{field}")
    return None, {}
  return real_data.prepare(data, os.fspath(out_dir), settings)


def parse_split_files(spec):
  """'train=a.jsonl,validation=b.jsonl' (or just 'a.jsonl', the train split) -> {split: path}."""
  files = {}
  for item in spec.split(","):
    split, sep, path = item.partition("=")
    if not sep:
      split, path = "train", item
    if not path or split in files:
      raise UserError(f"--input must look like train=a.jsonl,validation=b.jsonl (got {spec!r})")
    files[split] = path
  return files


def main(argv):
  """Entry point; flags are defined in `_define_flags`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if f.source == "offline":
    paths = prepare_offline(f.out_dir, seed=f.seed, overwrite=f.overwrite)
    print(f"offline task written to {f.out_dir}; TFDS datasets in {paths['tfds']}")
    return
  if not f.input:
    raise UserError(f"--input is required with --source={f.source}")
  if f.source == "jsonl":
    if f.kind not in schema.KINDS:
      raise UserError(f"--kind must be one of {', '.join(schema.KINDS)} with --source=jsonl")
    builders.build_dataset(f.kind, parse_split_files(f.input), tfds_dir(f.out_dir), f.overwrite)
    print(f"{f.kind} dataset built in {tfds_dir(f.out_dir)}")
    return
  counts, skipped = prepare_real(f.source, f.out_dir, f.input, f.heldout, f.heldout_fraction,
                                 f.sft, f.ptx, f.limit)
  if counts is None:
    print(f"{f.out_dir} already holds these data; TFDS datasets in {tfds_dir(f.out_dir)}")
    return
  shown = ", ".join(f"{k} {c['train']}/{c['validation']}" for k, c in counts.items())
  print(f"converted {f.input} (train/validation records: {shown}; "
        f"{', '.join(f'{n} skipped: {r}' for r, n in skipped.items())}); "
        f"TFDS datasets in {tfds_dir(f.out_dir)}")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("source", "offline", SOURCES, "What to prepare.")
  flags.DEFINE_string("input", None, "Input JSONL file (hh_rlhf, tldr) or split=path list (jsonl).")
  flags.DEFINE_string("heldout", "", "hh_rlhf/tldr: held-out comparisons file ('' = a hash split).")
  flags.DEFINE_float("heldout_fraction", 0.05, "hh_rlhf/tldr: share of prompts held out.")
  flags.DEFINE_string("sft", "", "hh_rlhf/tldr: demonstrations file ('' = preferred responses).")
  flags.DEFINE_string("ptx", "", "hh_rlhf/tldr: pretraining text (.txt or JSONL with 'text').")
  flags.DEFINE_integer("limit", 0, "hh_rlhf/tldr: first N usable comparisons (0 = all).")
  flags.DEFINE_enum("kind", None, list(schema.KINDS), "Record kind of --source=jsonl files.")
  flags.DEFINE_string("out_dir", None, "Output folder.", required=True)
  flags.DEFINE_integer("seed", 0, "Seed of the offline task.")
  flags.DEFINE_bool("overwrite", False, "Rebuild datasets that were built from other files.")


if __name__ == "__main__":
  from rlhf_jax.errors import run_cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  run_cli(main)
