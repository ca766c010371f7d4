"""Prepare data sets: JSONL (ours, converted, or the generated offline task) -> TFDS array_record.

  python -m rlhf_jax.data.prepare --source=offline --out_dir=work/data
  python -m rlhf_jax.data.prepare --source=hh_rlhf --input=train.jsonl --out_dir=work/hh
  python -m rlhf_jax.data.prepare --source=tldr --input=comparisons.jsonl --out_dir=work/tldr
  python -m rlhf_jax.data.prepare --source=jsonl --kind=sft \\
      --input=train=a.jsonl,validation=b.jsonl --out_dir=work/mine

JSONL files land in `out_dir`, the TFDS datasets in `out_dir/tfds` (load them with
`builders.load_source(out_dir + "/tfds", kind, split)`). Bad input ends with a one-line error and
exit status 2.
"""
import os

from rlhf_jax.data import builders
from rlhf_jax.data import formats
from rlhf_jax.data import offline_dataset
from rlhf_jax.data import offline_task
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
  paths, skipped = prepare_public(f.source, f.input, f.out_dir, f.overwrite)
  print(f"converted {f.input} ({', '.join(f'{n} skipped: {r}' for r, n in skipped.items())}); "
        f"TFDS datasets in {paths['tfds']}")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("source", "offline", SOURCES, "What to prepare.")
  flags.DEFINE_string("input", None, "Input JSONL file (hh_rlhf, tldr) or split=path list (jsonl).")
  flags.DEFINE_enum("kind", None, list(schema.KINDS), "Record kind of --source=jsonl files.")
  flags.DEFINE_string("out_dir", None, "Output folder.", required=True)
  flags.DEFINE_integer("seed", 0, "Seed of the offline task.")
  flags.DEFINE_bool("overwrite", False, "Rebuild datasets that were built from other files.")


if __name__ == "__main__":
  from rlhf_jax.errors import run_cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  run_cli(main)
