"""Tokenizers: load a Hugging Face tokenizer from a local path, or train a small one offline.

Documents are encoded as `[bos] + encode(prompt) + encode(response) + [eos]`: prompt and response
are encoded separately (never with the tokenizer's own special tokens), so the prompt/response
boundary is exact and `decode(encode(text)) == text` for byte-level tokenizers.
"""
import dataclasses
import os

import numpy as np

from rlhf_jax.errors import UserError

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
# In this order they get ids 0, 1, 2, the ids the `tiny` model presets expect.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A Hugging Face tokenizer plus the special ids the data pipeline uses.

  Attributes:
    hf: the `transformers` tokenizer.
    bos_id: prepended to every document, or None when the tokenizer has no bos token.
    eos_id: appended to every response and pretraining document.
    pad_id: fills padding positions (only cosmetic: segment ids mark padding); the eos id when the
      tokenizer has no pad token.
    path: where it was loaded from, for error messages.
  """
  hf: object
  bos_id: int | None
  eos_id: int
  pad_id: int
  path: str

  @property
  def vocab_size(self):
    """Number of token ids the tokenizer can produce (special tokens included)."""
    return len(self.hf)

  def encode(self, text):
    """Token ids of `text` as int32, without special tokens."""
    backend = getattr(self.hf, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer itself: same ids, far less Python overhead
      ids = backend.encode(text, add_special_tokens=False).ids
    else:
      ids = self.hf.encode(text, add_special_tokens=False)
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids):
    """Text of `ids` exactly as encoded (special tokens, if any, are kept as text)."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)


def from_hf(hf, path="<in memory>"):
  """Wraps a `transformers` tokenizer; it must have an eos token."""
  if hf.eos_token_id is None:
    raise UserError(f"{path}: the tokenizer has no eos token (expected one, e.g. '{EOS_TOKEN}')")
  pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
  return TextTokenizer(hf=hf, bos_id=hf.bos_token_id, eos_id=hf.eos_token_id, pad_id=pad_id,
                       path=path)


def load_tokenizer(path):
  """Loads a tokenizer from a local directory (`save_pretrained` layout) or a `.gguf` file.

  Nothing is downloaded and no remote code runs.
  """
  # Imported here: transformers is slow to import and only needed when a tokenizer is loaded.
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise UserError(f"{path}: no such GGUF file (expected a model file with a tokenizer)")
    kwargs = dict(gguf_file=os.path.basename(path))
    directory = os.path.dirname(path) or "."
  else:
    if not os.path.isdir(path):
      raise UserError(f"{path}: no such tokenizer directory (expected a folder written by "
                      "save_pretrained, with tokenizer.json)")
    kwargs = {}
    directory = path
  try:
    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False,
                                       **kwargs)
  except (OSError, ValueError, KeyError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{path}: cannot load a tokenizer ({first_line})") from None
  return from_hf(hf, path)


def train_byte_bpe(texts, out_dir, vocab_size=512):
  """Trains a byte-level BPE tokenizer on `texts` and saves it to `out_dir`; returns it loaded.

  Byte-level, so any text round-trips exactly; digits are always single tokens (which keeps
  arithmetic learnable). Special tokens <pad>, <bos>, <eos> get ids 0, 1, 2. Training is
  deterministic: the same texts give bit-for-bit the same files.
  """
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  # pylint: enable=g-import-not-at-top
  min_size = len(SPECIAL_TOKENS) + 256
  if vocab_size < min_size:
    raise UserError(f"tokenizer vocab_size must be at least {min_size} for a byte-level "
                    f"tokenizer (got {vocab_size})")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                               eos_token=EOS_TOKEN)
  out_dir = os.fspath(out_dir)
  hf.save_pretrained(out_dir)
  return from_hf(hf, out_dir)
