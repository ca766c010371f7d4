"""TFDS builders (array_record) for the four kinds of RLHF data, built from local JSONL files.

No TensorFlow is needed: the builders are `tfds.core.GeneratorBasedBuilder`s that write the
`array_record` file format, and `load_source` reads a split back as a random-access
`tfds.data_source` for grain. Records keep the order of their JSONL file (record i = line i,
blank lines skipped); grain shuffles.

On disk: `{data_dir}/rlhf_{kind}/1.0.0/rlhf_{kind}-{split}.array_record-*`. The dataset's metadata
records a fingerprint of its JSONL files: building again from the same files reuses the dataset,
building from changed files is refused unless `overwrite=True`.

Features (text is stored as UTF-8 and read back as bytes):
  ptx          text: Text
  sft          prompt: Text, response: Text
  comparisons  prompt: Text, responses: Sequence(Text), ranks: Tensor((None,), int32),
               and the sampled ids when the records have them (else empty): response_ids (all
               responses' ids concatenated), id_lengths and ended, each Tensor((None,), int32)
  prompts      prompt: Text
"""
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import schema
from rlhf_jax.errors import UserError

VERSION = "1.0.0"


def _features(kind):
  """The TFDS features of one kind of record."""
  text = tfds.features.Text
  if kind == schema.PTX:
    return {"text": text()}
  if kind == schema.SFT:
    return {"prompt": text(), "response": text()}
  if kind == schema.COMPARISONS:
    ints = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return {"prompt": text(), "responses": tfds.features.Sequence(text()), "ranks": ints(),
            "response_ids": ints(), "id_lengths": ints(), "ended": ints()}
  return {"prompt": text()}


def _example(record, kind):
  """A validated JSONL record as a TFDS example."""
  if kind == schema.COMPARISONS:
    ids = record.get("response_ids", [])
    return {"prompt": record["prompt"], "responses": list(record["responses"]),
            "ranks": np.asarray(record["ranks"], np.int32),
            "response_ids": np.asarray([t for r in ids for t in r], np.int32),
            "id_lengths": np.asarray([len(r) for r in ids], np.int32),
            "ended": np.asarray(record.get("ended", []), np.int32)}
  return dict(record)


class _RlhfBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds one kind of RLHF data from validated records, one JSONL file per split."""
  VERSION = tfds.core.Version(VERSION)
  KIND = None

  def __init__(self, *, split_records=None, fingerprint=None, **kwargs):
    """`split_records` ({split: records}) and `fingerprint` are only needed to prepare."""
    self._split_records = split_records or {}
    self._fingerprint = fingerprint
    super().__init__(**kwargs)

  @property
  def url_infos(self):
    """Nothing is downloaded (and TFDS's look-up of a checksums file beside the code is skipped)."""
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"rlhf_jax {self.KIND} records (schema: rlhf_jax.data.schema).",
        features=tfds.features.FeaturesDict(_features(self.KIND)),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    self.info.metadata["kind"] = self.KIND
    self.info.metadata["fingerprint"] = self._fingerprint
    if self.KIND == schema.COMPARISONS:
      self.info.metadata["max_k"] = {
          split: max(len(r["responses"]) for r in records)
          for split, records in self._split_records.items()}
    return {split: self._generate_examples(records)
            for split, records in self._split_records.items()}

  def _generate_examples(self, records):
    for i, record in enumerate(records):
      yield i, _example(record, self.KIND)


class RlhfPtx(_RlhfBuilder):
  """Pretraining text: {"text"}."""
  KIND = schema.PTX


class RlhfSft(_RlhfBuilder):
  """Demonstrations: {"prompt", "response"}."""
  KIND = schema.SFT


class RlhfComparisons(_RlhfBuilder):
  """K-way ranked comparisons: {"prompt", "responses", "ranks"}."""
  KIND = schema.COMPARISONS


class RlhfPrompts(_RlhfBuilder):
  """Prompts: {"prompt"}."""
  KIND = schema.PROMPTS


BUILDERS = {schema.PTX: RlhfPtx, schema.SFT: RlhfSft, schema.COMPARISONS: RlhfComparisons,
            schema.PROMPTS: RlhfPrompts}


def _fingerprint(kind, jsonl_files):
  """sha256 over the kind, the split names and the bytes of each split's file."""
  digest = hashlib.sha256(f"{kind}/{VERSION}".encode())
  for split in sorted(jsonl_files):
    digest.update(f"\n{split}\n".encode())
    with open(jsonl_files[split], "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


def _check_split_name(split):
  if not isinstance(split, str) or not split.replace("_", "").isalnum():
    raise UserError(f"split name must be letters, digits or '_' (got {split!r})")


def build_dataset(kind, jsonl_files, data_dir, overwrite=False):
  """Builds (or reuses) the TFDS dataset of `kind` from {split: JSONL path}; returns the builder.

  Every file is read and validated before anything is written, so a bad record fails with its
  file and line and leaves no half-built dataset.
  """
  schema.check_kind(kind)
  if not jsonl_files:
    raise UserError(f"no JSONL files given for the {kind} dataset (expected {{split: path}})")
  jsonl_files = {split: os.fspath(path) for split, path in jsonl_files.items()}
  split_records = {}
  for split, path in jsonl_files.items():
    _check_split_name(split)
    split_records[split] = schema.read_jsonl(path, kind)
  fingerprint = _fingerprint(kind, jsonl_files)
  tfds.disable_progress_bar()
  builder = BUILDERS[kind](data_dir=os.fspath(data_dir), file_format="array_record",
                           split_records=split_records, fingerprint=fingerprint)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    if builder.info.metadata.get("fingerprint") == fingerprint:
      return builder
    if not overwrite:
      raise UserError(f"{builder.data_dir}: already holds a {kind} dataset built from other "
                      "files (expected the same files; pass overwrite=True or another data_dir)")
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


def prepared_builder(data_dir, kind):
  """The builder of an already built dataset of `kind` under `data_dir`."""
  schema.check_kind(kind)
  builder = BUILDERS[kind](data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise UserError(f"{builder.data_dir}: no {kind} dataset there (expected one made by "
                    "build_dataset from JSONL files)")
  return builder


def load_source(data_dir, kind, split):
  """A random-access data source (len, [i]) over one split of a built dataset."""
  builder = prepared_builder(data_dir, kind)
  if split not in builder.info.splits:
    raise UserError(f"{builder.data_dir}: no split '{split}' (expected one of "
                    f"{', '.join(sorted(builder.info.splits))})")
  return builder.as_data_source(split=split)


def build_datasets(files_by_kind, data_dir, overwrite=False):
  """Builds several kinds at once from {kind: {split: JSONL path}}; returns {kind: builder}.

  All files are validated before the first dataset is written.
  """
  for kind, files in files_by_kind.items():
    schema.check_kind(kind)
    for path in files.values():
      schema.read_jsonl(path, kind)
  return {kind: build_dataset(kind, files, data_dir, overwrite)
          for kind, files in files_by_kind.items()}
