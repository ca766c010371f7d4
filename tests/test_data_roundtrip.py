"""Round trip for each kind: JSONL -> TFDS (array_record) -> grain batch -> detokenized == input."""
import collections

import numpy as np
import pytest

from rlhf_jax.data import builders
from rlhf_jax.data import loaders
from rlhf_jax.data import packing
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

RECORDS = {
    "ptx": [{"text": "The cat sat on the mat."}, {"text": "Ünïcödé   spaces\tand\nnewlines 12345"},
            {"text": "x"}, {"text": "fig apple pear. 23 plus 58 is 81."}],
    "sft": [{"prompt": "Q: Sort the words: pear fig\nA:", "response": " fig pear"},
            {"prompt": "\n\nHuman: Hi 👋\n\nAssistant:", "response": " Hello!"},
            {"prompt": "", "response": "no prompt at all"},
            {"prompt": "Q: What is 2 plus 2?\nA:", "response": ""},
            {"prompt": "Q: Count fig in: fig fig\nA:", "response": " 2"}],
    "comparisons": [
        {"prompt": "Q: hi\nA:", "responses": [" a", " bb", " a"], "ranks": [0, 1, 0]},
        {"prompt": "SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:", "responses": [" one", " two"],
         "ranks": [1, 0]},
        {"prompt": "", "responses": ["", " é", " z", " y", " x"], "ranks": [4, 3, 2, 1, 0]}],
    "prompts": [{"prompt": "Q: Reverse the words: a b c\nA:"}, {"prompt": "Ω"},
                {"prompt": "\n\nHuman: long " + "word " * 5 + "\n\nAssistant:"}],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [str(value) for records in RECORDS.values() for r in records for value in r.values()]
  return tokenizer_lib.train_byte_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _build(tmp_path, kind, records):
  path = tmp_path / f"{kind}.jsonl"
  schema.write_jsonl(path, records, kind)
  builders.build_dataset(kind, {"train": path}, tmp_path / "tfds")
  return builders.load_source(tmp_path / "tfds", kind, "train")


def _strip(ids, first, last):
  """Checks ids start with `first` and end with `last` (None = nothing) and returns the middle."""
  ids = list(ids)
  if first is not None:
    assert ids[0] == first
    ids = ids[1:]
  if last is not None:
    assert ids[-1] == last
    ids = ids[:-1]
  return ids


def _packed_documents(loader):
  for batch in loader:
    for b in range(batch["tokens"].shape[0]):
      yield from packing.unpack_row({k: v[b] for k, v in batch.items()})


def _decoded_sft(loader, tok):
  out = []
  for doc in _packed_documents(loader):
    mask = doc["loss_mask"] > 0
    prompt = _strip(doc["tokens"][~mask], tok.bos_id, None)
    response = _strip(doc["tokens"][mask], None, tok.eos_id)
    assert mask.tolist() == sorted(mask.tolist())  # prompt first, then response
    out.append((tok.decode(prompt), tok.decode(response)))
  return out


def test_ptx_round_trip(tmp_path, tokenizer):
  source = _build(tmp_path, "ptx", RECORDS["ptx"])
  loader = loaders.ptx_loader(source, tokenizer, batch_size=1, seq_len=64, num_epochs=1)
  texts = [tokenizer.decode(_strip(d["tokens"], tokenizer.bos_id, tokenizer.eos_id))
           for d in _packed_documents(loader)]
  assert sorted(texts) == sorted(r["text"] for r in RECORDS["ptx"])


def test_sft_round_trip_packed_and_unpacked(tmp_path, tokenizer):
  source = _build(tmp_path, "sft", RECORDS["sft"])
  expected = sorted((r["prompt"], r["response"]) for r in RECORDS["sft"])
  packed = loaders.sft_loader(source, tokenizer, batch_size=1, seq_len=48, num_epochs=1)
  assert sorted(_decoded_sft(packed, tokenizer)) == expected
  unpacked = loaders.sft_loader(source, tokenizer, batch_size=2, seq_len=48, num_epochs=1,
                                pack=False, drop_remainder=False)
  batches = list(unpacked)
  assert sorted(_decoded_sft(batches, tokenizer)) == expected
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index.tolist()) == [-1, 0, 1, 2, 3, 4]
  for batch in batches:
    for row, last in zip(batch["tokens"], batch["last_index"]):
      assert row[last] == tokenizer.eos_id or row[last] == tokenizer.pad_id


def _decoded_comparisons(loader, tok):
  out = {}
  for batch in loader:
    for b, index in enumerate(batch["index"]):
      if index == -1:  # a padding row of the last batch
        assert not batch["response_valid"][b].any() and not batch["segment_ids"][b].any()
        continue
      responses, ranks = [], []
      for k in np.flatnonzero(batch["response_valid"][b]):
        n = batch["lengths"][b, k]
        tokens, mask = batch["tokens"][b, k, :n], batch["response_mask"][b, k, :n] > 0
        assert batch["last_index"][b, k] == n - 1 and (batch["segment_ids"][b, k, :n] == 1).all()
        assert not batch["segment_ids"][b, k, n:].any()
        prompt = tok.decode(_strip(tokens[~mask], tok.bos_id, None))
        responses.append(tok.decode(_strip(tokens[mask], None, tok.eos_id)))
        ranks.append(int(batch["ranks"][b, k]))
      assert (batch["ranks"][b, len(ranks):] == -1).all()
      out[int(index)] = {"prompt": prompt, "responses": responses, "ranks": ranks}
  return out


def test_comparisons_round_trip(tmp_path, tokenizer):
  source = _build(tmp_path, "comparisons", RECORDS["comparisons"])
  loader = loaders.comparison_loader(source, tokenizer, batch_size=2, seq_len=48, k_max=6,
                                     num_epochs=1, drop_remainder=False)
  batch = next(iter(loader))
  assert batch["tokens"].shape == (2, 6, 48) and batch["ranks"].shape == (2, 6)
  decoded = _decoded_comparisons(loader, tokenizer)
  assert decoded == dict(enumerate(RECORDS["comparisons"]))


def test_prompts_round_trip_left_padded(tmp_path, tokenizer):
  source = _build(tmp_path, "prompts", RECORDS["prompts"])
  loader = loaders.prompt_loader(source, tokenizer, batch_size=3, prompt_len=40, num_epochs=1)
  batch = next(iter(loader))
  for row, seg, pos, n, index in zip(batch["tokens"], batch["segment_ids"], batch["positions"],
                                     batch["lengths"], batch["index"]):
    assert seg.tolist() == [0] * (40 - n) + [1] * n
    assert pos[-n:].tolist() == list(range(n))
    text = tokenizer.decode(_strip(row[-n:], tokenizer.bos_id, None))
    assert text == RECORDS["prompts"][index]["prompt"]


def test_tfds_keeps_jsonl_order_and_refuses_stale_data(tmp_path):
  source = _build(tmp_path, "sft", RECORDS["sft"])
  assert [source[i]["prompt"].decode() for i in range(len(source))] == [
      r["prompt"] for r in RECORDS["sft"]]
  _build(tmp_path, "sft", RECORDS["sft"])  # same files: reused
  with pytest.raises(UserError, match="already holds a sft dataset built from other files"):
    _build(tmp_path, "sft", RECORDS["sft"][:2])
  path = tmp_path / "sft.jsonl"
  builders.build_dataset("sft", {"train": path}, tmp_path / "tfds", overwrite=True)
  assert len(builders.load_source(tmp_path / "tfds", "sft", "train")) == 2
  with pytest.raises(UserError, match="no split 'test'"):
    builders.load_source(tmp_path / "tfds", "sft", "test")
  with pytest.raises(UserError, match="no prompts dataset there"):
    builders.load_source(tmp_path / "tfds", "prompts", "train")


def test_comparison_metadata_and_k_max_check(tmp_path, tokenizer):
  source = _build(tmp_path, "comparisons", RECORDS["comparisons"])
  builder = builders.prepared_builder(tmp_path / "tfds", "comparisons")
  assert builder.info.metadata["max_k"] == {"train": 5}
  loader = loaders.comparison_loader(source, tokenizer, batch_size=3, seq_len=32, k_max=4,
                                     num_epochs=1, shuffle=False)
  with pytest.raises(UserError, match="record 2 has 5 responses but k_max is 4"):
    next(iter(loader))


def test_counts_in_one_epoch(tmp_path, tokenizer):
  source = _build(tmp_path, "sft", RECORDS["sft"] * 3)
  loader = loaders.sft_loader(source, tokenizer, batch_size=4, seq_len=20, num_epochs=1,
                              pack=False, drop_remainder=False)
  counts = collections.Counter(int(i) for b in loader for i in b["index"])
  assert counts == collections.Counter({i: 1 for i in range(15)} | {-1: 1})
