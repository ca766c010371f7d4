"""grain input pipelines: deterministic, shuffled by seed, sharded per host, checkpointable.

Each loader takes a random-access source of records (what `builders.load_source` returns: a TFDS
array_record data source; a list of record dicts works too) and returns a `grain.IterDataset` of
numpy batches with fixed shapes. `iter(loader)` gives an iterator whose `get_state()` /
`set_state(state)` resume at exactly the same next batch.

Order of operations: host shard (each host keeps records `index::count` of the first
`len - len % count`, so hosts get equally many) -> shuffle with `seed` (a new permutation every
epoch) -> repeat `num_epochs` (None = forever) -> tokenize -> pack or pad -> batch.

Batches (B = batch_size; every `loss_mask`/`response_mask` is aligned with tokens as targets, see
`encoding`):
  ptx_loader, sft_loader (packed)
    tokens, segment_ids, positions (B, T) int32; loss_mask (B, T) float32
  sft_loader(pack=False)    one demonstration per row, right-padded: the packed keys plus
    last_index (B,) int32 (index of eos) and index (B,) int32 (record index, -1 on padding rows)
  comparison_loader         right-padded rows `[bos] prompt response [eos] pad...`:
    tokens, segment_ids, positions (B, K_max, T) int32; response_mask (B, K_max, T) float32;
    lengths, last_index, ranks (B, K_max) int32 (ranks: 0 = best, RANK_PAD = -1 where missing);
    response_valid (B, K_max) float32; index (B,) int32
  prompt_loader             left-padded `pad... [bos] prompt`:
    tokens, segment_ids, positions (B, T_prompt) int32; lengths (B,) int32; index (B,) int32
With `drop_remainder=False` a finite loader pads its last batch with rows whose `index` is -1 and
whose masks are all zero, so the shapes never change. `prefetch=N` builds N batches ahead in a
background thread.
"""
import functools

import grain
import numpy as np

from rlhf_jax.data import encoding
from rlhf_jax.data import packing
from rlhf_jax.errors import UserError


def host_shard(shard=None):
  """(index, count) of this host: `shard` when given, else jax's process index and count."""
  if shard is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  index, count = shard
  if not 0 <= index < count:
    raise UserError(f"shard must be (index, count) with 0 <= index < count (got {shard})")
  return int(index), int(count)


def _check_positive(name, value):
  if not isinstance(value, (int, np.integer)) or value <= 0:
    raise UserError(f"{name} must be a positive integer (got {value!r})")


def text_of(value):
  """Text of a record field: TFDS data sources return bytes, lists of dicts hold str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _with_index(index, record, num_records):
  """(record index, record); past the first epoch grain's indices run beyond the source and it
  reads them modulo its size, so the record index is taken modulo too."""
  return index % num_records, record


def indexed_records(source, *, seed, shuffle, num_epochs, shard):
  """The sharded, shuffled, repeated MapDataset of (record index, record) pairs."""
  shard_index, shard_count = host_shard(shard)
  ds = grain.MapDataset.source(source)
  ds = ds.map_with_index(functools.partial(_with_index, num_records=len(ds)))
  ds = ds[:len(ds) - len(ds) % shard_count][shard_index::shard_count]
  if len(ds) == 0:
    raise UserError(f"the data has {len(source)} records, fewer than the {shard_count} hosts "
                    "that share it")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs is not None:
    _check_positive("num_epochs", num_epochs)
  return ds.repeat(num_epochs)


def _read_options(num_threads):
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(8, 4 * num_threads))


def _pad_batch(batch, batch_size, pad_id):
  """Pads a short last batch to `batch_size` rows (index -1, masks 0, ranks RANK_PAD)."""
  n = len(batch["index"])
  if n == batch_size:
    return batch
  padded = {}
  for key, value in batch.items():
    fill = {"index": -1, "ranks": encoding.RANK_PAD, "tokens": pad_id}.get(key, 0)
    rows = np.full((batch_size - n,) + value.shape[1:], fill, value.dtype)
    padded[key] = np.concatenate([value, rows])
  return padded


def _batch(ds, batch_size, drop_remainder, pad_id, prefetch):
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    ds = ds.map(functools.partial(_pad_batch, batch_size=batch_size, pad_id=pad_id))
  return _prefetch(ds, prefetch)


def _prefetch(ds, prefetch):
  """Makes `prefetch` batches ahead in a background thread (packing and batching included), so
  they overlap the training step; 0 (the default) turns it off. The iterator state stays exact.
  Call the iterator's `close()` when done with it: grain's prefetch thread otherwise complains at
  interpreter exit."""
  if not prefetch:
    return ds
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)


# ---------------------------------------------------------------- pretraining text (ptx)


def _encode_ptx(item, tokenizer):
  _, record = item
  return tokenizer.encode(text_of(record["text"]))


class _PtxChunks(grain.experimental.FlatMapTransform):
  """Splits a tokenized pretraining document into chunks of at most seq_len tokens."""

  def __init__(self, tokenizer, seq_len, max_chunks):
    self.max_fan_out = max_chunks
    self._tokenizer = tokenizer
    self._seq_len = seq_len

  def flat_map(self, element):
    return encoding.ptx_chunks(element, self._tokenizer.bos_id, self._tokenizer.eos_id,
                               self._seq_len, self.max_fan_out)


def ptx_loader(source, tokenizer, *, batch_size, seq_len, seed=0, num_epochs=None, shard=None,
               shuffle=True, num_bins=None, max_chunks=64, num_threads=2, prefetch=0):
  """Packed pretraining batches (B, seq_len); a long document is split into chunks."""
  _check_positive("batch_size", batch_size)
  _check_positive("seq_len", seq_len)
  ds = indexed_records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
  ds = ds.map(functools.partial(_encode_ptx, tokenizer=tokenizer))
  docs = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(_read_options(num_threads)),
                                               _PtxChunks(tokenizer, seq_len, max_chunks))
  rows = packing.pack_documents(docs, seq_len, tokenizer.pad_id, num_bins or batch_size)
  return _prefetch(rows.batch(batch_size, drop_remainder=True), prefetch)


# ---------------------------------------------------------------- demonstrations (SFT)


def _encode_sft(item, tokenizer, seq_len):
  index, record = item
  doc = encoding.sft_document(tokenizer.encode(text_of(record["prompt"])),
                              tokenizer.encode(text_of(record["response"])),
                              tokenizer.bos_id, tokenizer.eos_id, seq_len)
  if doc is not None:
    doc["index"] = np.int32(index)
  return doc


def _sft_row(doc, seq_len, pad_id):
  row = encoding.right_pad_document(doc, seq_len, pad_id)
  row["index"] = doc["index"]
  return row


def _drop_index(doc):
  return {"tokens": doc["tokens"], "loss_mask": doc["loss_mask"]}


def sft_loader(source, tokenizer, *, batch_size, seq_len, seed=0, num_epochs=None, shard=None,
               shuffle=True, pack=True, num_bins=None, drop_remainder=True, num_threads=2,
               prefetch=0):
  """Demonstration batches (B, seq_len): packed rows, or one right-padded document per row.

  A demonstration longer than seq_len loses its tail; one whose prompt alone fills seq_len is
  skipped. Packed batches always drop a last partial batch.
  """
  _check_positive("batch_size", batch_size)
  _check_positive("seq_len", seq_len)
  ds = indexed_records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
  ds = ds.map(functools.partial(_encode_sft, tokenizer=tokenizer, seq_len=seq_len))
  docs = ds.to_iter_dataset(_read_options(num_threads))  # drops the skipped (None) documents
  if pack:
    rows = packing.pack_documents(docs.map(_drop_index), seq_len, tokenizer.pad_id,
                                  num_bins or batch_size)
    return _prefetch(rows.batch(batch_size, drop_remainder=True), prefetch)
  rows = docs.map(functools.partial(_sft_row, seq_len=seq_len, pad_id=tokenizer.pad_id))
  return _batch(rows, batch_size, drop_remainder, tokenizer.pad_id, prefetch)


# ---------------------------------------------------------------- ranked comparisons (RM)


def sampled_ids(record):
  """(per-response token ids, ended flags) of a comparisons record sampled from a policy (the
  collect stage stores them), or (None, None) for text-only records."""
  ended = record.get("ended")
  if ended is None or len(ended) != len(record["responses"]):
    return None, None
  if "id_lengths" not in record:   # a JSONL record: one list per response
    return [np.asarray(r, np.int32) for r in record["response_ids"]], [bool(e) for e in ended]
  flat, lengths = np.asarray(record["response_ids"]), np.asarray(record["id_lengths"])  # TFDS
  starts = np.concatenate([[0], np.cumsum(lengths)])
  return [flat[a:b] for a, b in zip(starts[:-1], starts[1:])], [bool(e) for e in ended]


def _encode_comparison(item, tokenizer, seq_len, k_max):
  index, record = item
  responses = [text_of(r) for r in record["responses"]]
  if len(responses) > k_max:
    raise UserError(f"comparisons record {index} has {len(responses)} responses but k_max is "
                    f"{k_max} (expected k_max >= the largest K in the data)")
  ids, ended = sampled_ids(record)
  if ids is None:    # text comparisons (human data): encode the text, every response ends
    ids = [tokenizer.encode(r) for r in responses]
  rows = encoding.comparison_rows(tokenizer.encode(text_of(record["prompt"])), ids,
                                  np.asarray(record["ranks"], np.int32), tokenizer.bos_id,
                                  tokenizer.eos_id, tokenizer.pad_id, seq_len, k_max, ended)
  rows["index"] = np.int32(index)
  return rows


def comparison_loader(source, tokenizer, *, batch_size, seq_len, k_max, seed=0, num_epochs=None,
                      shard=None, shuffle=True, drop_remainder=True, num_threads=2,
                      prefetch=0):
  """Batches of B prompts, each with K_max right-padded responses (B, K_max, seq_len)."""
  _check_positive("batch_size", batch_size)
  _check_positive("seq_len", seq_len)
  _check_positive("k_max", k_max)
  ds = indexed_records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
  ds = ds.map(functools.partial(_encode_comparison, tokenizer=tokenizer, seq_len=seq_len,
                                k_max=k_max))
  return _batch(ds.to_iter_dataset(_read_options(num_threads)), batch_size, drop_remainder,
                tokenizer.pad_id, prefetch)


# ---------------------------------------------------------------- prompts (PPO, evaluation)


def _encode_prompt(item, tokenizer, prompt_len):
  index, record = item
  row = encoding.prompt_row(tokenizer.encode(text_of(record["prompt"])), tokenizer.bos_id,
                            tokenizer.pad_id, prompt_len)
  row["index"] = np.int32(index)
  return row


def prompt_loader(source, tokenizer, *, batch_size, prompt_len, seed=0, num_epochs=None,
                  shard=None, shuffle=True, drop_remainder=True, num_threads=2,
                      prefetch=0):
  """Batches of left-padded prompts (B, prompt_len); a long prompt keeps its right end."""
  _check_positive("batch_size", batch_size)
  _check_positive("prompt_len", prompt_len)
  ds = indexed_records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
  ds = ds.map(functools.partial(_encode_prompt, tokenizer=tokenizer, prompt_len=prompt_len))
  return _batch(ds.to_iter_dataset(_read_options(num_threads)), batch_size, drop_remainder,
                tokenizer.pad_id, prefetch)
