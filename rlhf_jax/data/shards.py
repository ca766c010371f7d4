"""Which data shards a process reads, and batches of its rows that every process steps through
together.

The records of a split are cut into `num_shards` shards (shard k keeps records k::num_shards, see
`loaders.indexed_records`), each read by its own loader: its own shuffle, packing and position. A
global batch holds the shards' rows in shard order, and process p holds those of shards
p*m .. (p+1)*m - 1 (m = num_shards / number of processes), which are exactly its rows of the
mesh (`sharding.process_batch_rows`).

num_shards 0 (`config.data.shards`' default) is one shard per process: each host reads only its
own records. A fixed num_shards makes the batches independent of how many processes read them:
one process with num_shards 2 reads the rows that two hosts read (tests/test_multihost_pipeline.py
compares the two runs).

  ShardedBatches  this process's rows from its shards; `get_state`/`set_state` resume each
                  shard at its own position (one state per process in a checkpoint,
                  `checkpoint.CheckpointManager`).
  lockstep        a finite stream of batches run by every process the same number of times (a
                  process whose data ran out steps on padding batches), as the jitted steps they
                  feed are collectives.
"""
import numpy as np

from rlhf_jax import distributed
from rlhf_jax.data import encoding
from rlhf_jax.errors import UserError


def process_shards(num_shards=0):
  """The (index, count) of each data shard this process reads, in row order."""
  import jax  # pylint: disable=g-import-not-at-top
  n, p = jax.process_count(), jax.process_index()
  num_shards = int(num_shards) or n
  if num_shards % n:
    raise UserError(f"config.data.shards ({num_shards}) must be a multiple of the number of "
                    f"processes ({n}); 0 = one per process")
  m = num_shards // n
  return [(k, num_shards) for k in range(p * m, (p + 1) * m)]


def padding_like(batch, pad_id=0):
  """A batch shaped like `batch` whose rows are all padding: index -1, ranks RANK_PAD, tokens
  pad_id, every mask, length and position 0 (the rows a finite loader pads its last batch with)."""
  fills = {"index": -1, "ranks": encoding.RANK_PAD, "tokens": pad_id}
  return {k: np.full_like(np.asarray(v), fills.get(k, 0)) for k, v in batch.items()}


class ShardedBatches:
  """Batches of this process's rows: `make(shard, rows)` is the loader of one shard (an iterable
  of batches of `rows` rows, e.g. `loaders.sft_loader(..., shard=shard)`), and each batch is the
  next batch of every shard of the process, concatenated in shard order.

  A finite loader whose shard runs out while another's has batches left gives padding rows
  (`padding_like`) until all are done. With one shard this is that shard's iterator, unchanged
  (its state too).
  """

  def __init__(self, make, batch_size, num_shards=0, pad_id=0, field="batch_size"):
    shards = process_shards(num_shards)
    if batch_size % len(shards):
      raise UserError(f"config.{field}: this process's {batch_size} rows do not split evenly "
                      f"over its {len(shards)} data shards (config.data.shards)")
    rows = batch_size // len(shards)
    self._its = [iter(make(shard, rows)) for shard in shards]
    self._pad_id = pad_id
    self._done = [False] * len(self._its)

  def __iter__(self):
    return self

  def __next__(self):
    if len(self._its) == 1:
      return next(self._its[0])
    parts = []
    for i, it in enumerate(self._its):
      if not self._done[i]:
        try:
          parts.append(next(it))
          continue
        except StopIteration:
          self._done[i] = True
      parts.append(None)
    if all(self._done):
      raise StopIteration
    template = next(p for p in parts if p is not None)
    parts = [padding_like(template, self._pad_id) if p is None else p for p in parts]
    return {k: np.concatenate([p[k] for p in parts]) for k in template}

  def get_state(self):
    if len(self._its) == 1:
      return self._its[0].get_state()
    return {"shards": [it.get_state() for it in self._its]}

  def set_state(self, state):
    if len(self._its) == 1:
      self._its[0].set_state(state)
      return
    if not isinstance(state, dict) or len(state.get("shards", ())) != len(self._its):
      raise ValueError(f"expected the positions of {len(self._its)} data shards")
    for it, s in zip(self._its, state["shards"]):
      it.set_state(s)

  def close(self):
    for it in self._its:
      if hasattr(it, "close"):
        it.close()


def lockstep(batches, pad_id=0, what="the data"):
  """Yields the batches of a finite iterable until every process's have run out; a process
  whose batches ran out first yields padding batches shaped like its last one, so all step
  through the same number of (collective) jitted calls. One process: the batches themselves."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    yield from batches
    return
  it, last = iter(batches), None
  while True:
    batch = next(it, None)
    if distributed.agree_max(batch is not None) == 0:
      return
    if batch is None:
      if last is None:
        raise UserError(f"{what}: process {jax.process_index()} got no batch while others did "
                        "(fewer records than processes?)")
      batch = padding_like(last, pad_id)
    last = batch
    yield batch
