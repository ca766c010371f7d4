"""grain loaders: determinism by seed, host sharding, checkpointable state, fixed shapes."""
import itertools

import numpy as np
import pytest

from rlhf_jax.data import loaders
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

WORDS = ["fig", "pear", "apple", "kiwi", "plum", "lime", "date", "grape"]


def _sft_records(n):
  return [{"prompt": f"Q: item {i}: {WORDS[i % 8]}\nA:", "response": " " + " ".join(
      WORDS[: 1 + i % 5])} for i in range(n)]


def _ptx_records(n):
  return [{"text": " ".join(WORDS[(i + j) % 8] for j in range(3 + 7 * (i % 4)))} for i in range(n)]


def _comparison_records(n):
  return [{"prompt": f"Q: {i}\nA:", "responses": [" a", " b" * (i % 3 + 1), " c"][: 2 + i % 2],
           "ranks": [0, 1, 2][: 2 + i % 2]} for i in range(n)]


def _prompt_records(n):
  return [{"prompt": f"Q: prompt number {i}\nA:"} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [r["prompt"] + r["response"] for r in _sft_records(40)] + WORDS
  return tokenizer_lib.train_byte_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _loaders(tokenizer, **kw):
  """One loader of every kind over small in-memory sources (lists of records work as sources)."""
  return {
      "ptx": loaders.ptx_loader(_ptx_records(30), tokenizer, batch_size=2, seq_len=16, **kw),
      "sft": loaders.sft_loader(_sft_records(30), tokenizer, batch_size=2, seq_len=24, **kw),
      "sft_rows": loaders.sft_loader(_sft_records(30), tokenizer, batch_size=3, seq_len=24,
                                     pack=False, **kw),
      "comparisons": loaders.comparison_loader(_comparison_records(30), tokenizer, batch_size=3,
                                               seq_len=12, k_max=3, **kw),
      "prompts": loaders.prompt_loader(_prompt_records(30), tokenizer, batch_size=4,
                                       prompt_len=10, **kw),
  }


def _take(loader, n):
  return list(itertools.islice(iter(loader), n))


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_same_seed_same_batches_other_seed_other_order(tokenizer):
  first = _loaders(tokenizer, seed=3, shard=(0, 1))
  again = _loaders(tokenizer, seed=3, shard=(0, 1))
  other = _loaders(tokenizer, seed=4, shard=(0, 1))
  for name in first:
    a, b, c = _take(first[name], 6), _take(again[name], 6), _take(other[name], 6)
    assert _same(a, b), name
    assert not _same(a, c), name


def test_fixed_shapes_and_dtypes(tokenizer):
  expected = {
      "ptx": {"tokens": (2, 16), "segment_ids": (2, 16), "positions": (2, 16),
              "loss_mask": (2, 16)},
      "sft": {"tokens": (2, 24), "segment_ids": (2, 24), "positions": (2, 24),
              "loss_mask": (2, 24)},
      "sft_rows": {"tokens": (3, 24), "segment_ids": (3, 24), "positions": (3, 24),
                   "loss_mask": (3, 24), "last_index": (3,), "index": (3,)},
      "comparisons": {"tokens": (3, 3, 12), "segment_ids": (3, 3, 12), "positions": (3, 3, 12),
                      "response_mask": (3, 3, 12), "lengths": (3, 3), "last_index": (3, 3),
                      "ranks": (3, 3), "response_valid": (3, 3), "index": (3,)},
      "prompts": {"tokens": (4, 10), "segment_ids": (4, 10), "positions": (4, 10),
                  "lengths": (4,), "index": (4,)},
  }
  for name, loader in _loaders(tokenizer, seed=0, shard=(0, 1)).items():
    for batch in _take(loader, 20):
      assert {k: v.shape for k, v in batch.items()} == expected[name], name
      for key, value in batch.items():
        want = np.float32 if key in ("loss_mask", "response_mask", "response_valid") else np.int32
        assert value.dtype == want, (name, key)


@pytest.mark.parametrize("name", ["ptx", "sft", "sft_rows", "comparisons", "prompts"])
def test_get_state_set_state_resumes_exactly(tokenizer, name):
  loader = _loaders(tokenizer, seed=1, shard=(0, 1))[name]
  iterator = iter(loader)
  for _ in range(7):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(9)]
  fresh = iter(_loaders(tokenizer, seed=1, shard=(0, 1))[name])
  fresh.set_state(state)
  assert _same([next(fresh) for _ in range(9)], expected)


def test_host_shards_are_disjoint_equal_and_cover_the_data(tokenizer):
  def indices(shard, n, epochs=1):
    loader = loaders.prompt_loader(_prompt_records(n), tokenizer, batch_size=1, prompt_len=10,
                                   seed=5, num_epochs=epochs, shard=shard)
    return [int(b["index"][0]) for b in loader]
  host0, host1 = indices((0, 2), 24), indices((1, 2), 24)
  assert not set(host0) & set(host1)
  assert sorted(host0 + host1) == list(range(24))
  # 25 records on 2 hosts: both get 12, so synchronous steps stay in step.
  host0, host1 = indices((0, 2), 25), indices((1, 2), 25)
  assert len(host0) == len(host1) == 12 and not set(host0) & set(host1)
  # each epoch is a new permutation of the same shard
  two_epochs = indices((0, 2), 24, epochs=2)
  assert sorted(two_epochs[:12]) == sorted(two_epochs[12:]) and two_epochs[:12] != two_epochs[12:]


def test_shard_defaults_to_the_jax_process(tokenizer):
  assert loaders.host_shard() == (0, 1)
  with pytest.raises(UserError, match="0 <= index < count"):
    loaders.host_shard((2, 2))
  with pytest.raises(UserError, match="fewer than the 4 hosts"):
    loaders.prompt_loader(_prompt_records(3), tokenizer, batch_size=1, prompt_len=8, shard=(0, 4))
  with pytest.raises(UserError, match="batch_size must be a positive integer"):
    loaders.sft_loader(_sft_records(3), tokenizer, batch_size=0, seq_len=8)


def test_unshuffled_finite_loader_pads_its_last_batch(tokenizer):
  loader = loaders.prompt_loader(_prompt_records(5), tokenizer, batch_size=4, prompt_len=10,
                                 num_epochs=1, shuffle=False, drop_remainder=False)
  batches = list(loader)
  assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, -1, -1, -1]]
  assert not batches[1]["segment_ids"][1:].any() and not batches[1]["lengths"][1:].any()
  assert (batches[1]["tokens"][1:] == tokenizer.pad_id).all()


def test_prefetching_loader_gives_the_same_batches_and_resumes(tokenizer):
  def make(prefetch):
    return loaders.sft_loader(_sft_records(30), tokenizer, batch_size=2, seq_len=24, seed=1,
                              shard=(0, 1), prefetch=prefetch)
  iterator = iter(make(2))
  assert _same([next(iterator) for _ in range(4)], _take(make(0), 4))
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(5)]
  iterator.close()
  fresh = iter(make(2))
  fresh.set_state(state)
  assert _same([next(fresh) for _ in range(5)], expected)
  fresh.close()
