"""Packing: masks are zero exactly on prompt and padding tokens, and segment ids keep documents
apart (a packed row gives the same logits as its documents run one by one)."""
import itertools

import jax
import numpy as np
import pytest

from rlhf_jax.data import encoding
from rlhf_jax.data import loaders
from rlhf_jax.data import packing
from rlhf_jax.data import tokenizer as tokenizer_lib

SFT = [{"prompt": "Q: Sort the words: pear fig\nA:", "response": " fig pear"},
       {"prompt": "Q: What is 12 plus 30?\nA:", "response": " 42"},
       {"prompt": "Hi", "response": " there, friend"},
       {"prompt": "Q: Count fig in: fig kiwi fig\nA:", "response": " 2"},
       {"prompt": "Q: Reverse the words: a b c\nA:", "response": " c b a"}] * 4
PTX = [{"text": "fig comes before pear."}, {"text": "12 plus 30 is 42. " * 6},
       {"text": "the list a b has 2 words."}] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [r["prompt"] + r["response"] for r in SFT] + [r["text"] for r in PTX]
  return tokenizer_lib.train_byte_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=320)


def _rows(loader, n):
  for batch in itertools.islice(iter(loader), n):
    for b in range(batch["tokens"].shape[0]):
      yield {k: v[b] for k, v in batch.items()}


def test_sft_mask_is_zero_exactly_on_prompt_and_padding(tokenizer):
  loader = loaders.sft_loader(SFT, tokenizer, batch_size=2, seq_len=40, seed=0, shard=(0, 1))
  prompt_ids = {r["prompt"]: tokenizer.encode(r["prompt"]).tolist() for r in SFT}
  response_ids = {r["prompt"]: tokenizer.encode(r["response"]).tolist() for r in SFT}
  documents = 0
  for row in _rows(loader, 6):
    padding = row["segment_ids"] == 0
    assert not row["loss_mask"][padding].any()
    assert (row["tokens"][padding] == tokenizer.pad_id).all()
    assert (row["positions"][padding] == 0).all()
    segments = row["segment_ids"][~padding]
    assert segments[0] == 1 and set(np.diff(segments)) <= {0, 1}  # numbered 1, 2, ... in order
    for doc in packing.unpack_row(row):
      documents += 1
      tokens = doc["tokens"].tolist()
      assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
      assert doc["positions"].tolist() == list(range(len(tokens)))
      prompt = tokenizer.decode(tokens[1:][:doc["loss_mask"].tolist().index(1.0) - 1])
      n_head = 1 + len(prompt_ids[prompt])
      assert doc["loss_mask"].tolist() == [0.0] * n_head + [1.0] * (len(tokens) - n_head)
      assert tokens[n_head:-1] == response_ids[prompt]
  assert documents > 12  # rows really hold several documents


def test_ptx_mask_and_long_documents_are_chunked(tokenizer):
  loader = loaders.ptx_loader(PTX, tokenizer, batch_size=2, seq_len=24, seed=0, shard=(0, 1))
  chunks = 0
  for row in _rows(loader, 6):
    assert not row["loss_mask"][row["segment_ids"] == 0].any()
    for doc in packing.unpack_row(row):
      chunks += 1
      assert doc["loss_mask"].tolist() == [0.0] + [1.0] * (len(doc["tokens"]) - 1)
  long_doc = tokenizer.encode(PTX[1]["text"])
  pieces = encoding.ptx_chunks(long_doc, 1, 2, seq_len=24, max_chunks=64)
  assert np.concatenate([p["tokens"] for p in pieces]).tolist() == [1] + long_doc.tolist() + [2]
  assert len(encoding.ptx_chunks(long_doc, 1, 2, seq_len=24, max_chunks=2)) == 2
  assert chunks > 12


def test_truncation_rules():
  doc = encoding.sft_document([5, 6, 7], [8, 9], bos_id=1, eos_id=2, seq_len=5)
  assert doc["tokens"].tolist() == [1, 5, 6, 7, 8] and doc["loss_mask"].tolist() == [0, 0, 0, 0, 1]
  assert encoding.sft_document([5, 6, 7, 8], [9], bos_id=1, eos_id=2, seq_len=5) is None
  rows = encoding.comparison_rows([5, 6, 7, 8], [[9], [10, 11]], [0, 1], bos_id=1, eos_id=2,
                                  pad_id=0, seq_len=6, k_max=3)
  assert rows["tokens"].tolist() == [[1, 7, 8, 9, 2, 0], [1, 7, 8, 10, 11, 2], [0] * 6]
  assert rows["response_mask"].tolist()[1] == [0, 0, 0, 1, 1, 1]
  assert rows["lengths"].tolist() == [5, 6, 0] and rows["last_index"].tolist() == [4, 5, 0]
  assert rows["ranks"].tolist() == [0, 1, -1] and rows["response_valid"].tolist() == [1, 1, 0]
  # a response too long even so: the prompt keeps half the row and the response loses its tail
  rows = encoding.comparison_rows([5, 6, 7, 8], [[9], [10, 11, 12, 13, 14, 15]], [1, 0], bos_id=1,
                                  eos_id=2, pad_id=0, seq_len=6, k_max=2)
  assert rows["tokens"].tolist() == [[1, 7, 8, 9, 2, 0], [1, 7, 8, 10, 11, 12]]
  row = encoding.prompt_row([5, 6, 7, 8], bos_id=1, pad_id=0, prompt_len=4)
  assert row["tokens"].tolist() == [1, 6, 7, 8] and row["lengths"] == 4


def test_segment_ids_stop_attention_across_documents(tokenizer):
  from rlhf_jax.models import Transformer, get_model_config  # pylint: disable=g-import-not-at-top
  cfg = get_model_config("tiny")
  assert tokenizer.vocab_size <= cfg.vocab_size
  loader = loaders.sft_loader(SFT, tokenizer, batch_size=2, seq_len=48, seed=0, shard=(0, 1))
  batch = next(iter(loader))
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), batch["tokens"])["params"]
  apply = jax.jit(lambda tokens, seg, pos: model.apply({"params": params}, tokens, segment_ids=seg,
                                                       positions=pos)[0])
  packed_logits = np.asarray(apply(batch["tokens"], batch["segment_ids"], batch["positions"]))
  # Each document alone in its own row (right-padded; causal attention never sees the padding).
  documents, where = [], []
  for b in range(batch["tokens"].shape[0]):
    row = {k: v[b] for k, v in batch.items()}
    starts = np.flatnonzero(np.diff(np.concatenate([[0], row["segment_ids"]])) != 0)
    for doc, start in zip(packing.unpack_row(row), starts):
      documents.append(doc["tokens"])
      where.append((b, start, len(doc["tokens"])))
  alone = np.zeros((len(documents), 48), np.int32)
  for i, tokens in enumerate(documents):
    alone[i, :len(tokens)] = tokens
  ones = np.ones_like(alone)
  alone_logits = np.asarray(apply(alone, ones, np.broadcast_to(np.arange(48), alone.shape)))
  for i, (b, start, n) in enumerate(where):
    np.testing.assert_allclose(packed_logits[b, start:start + n], alone_logits[i, :n],
                               atol=2e-4, rtol=2e-4)
  assert len(documents) >= 4
  # Without segment ids and positions the same rows leak across documents: the test can tell.
  leaky = np.asarray(apply(batch["tokens"], np.ones_like(batch["tokens"]),
                           np.broadcast_to(np.arange(48), batch["tokens"].shape)))
  real = batch["segment_ids"] > 0
  assert not np.allclose(leaky[real], packed_logits[real], atol=2e-4)
