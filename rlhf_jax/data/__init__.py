"""Data: JSONL schema, TFDS builders (array_record), public-format converters, tokenizers, grain
loaders with packing, and the offline task with its gold and simulated labelers.

Typical use (`from rlhf_jax.data import prepare`, or `python -m rlhf_jax.data.prepare`):
  paths = prepare.prepare_offline("work/offline")    # JSONL + tokenizer + TFDS; or prepare_public
  tokenizer = tokenizer_lib.load_tokenizer(paths["tokenizer"])
  source = builders.load_source(paths["tfds"], "sft", "train")
  batches = loaders.sft_loader(source, tokenizer, batch_size=8, seq_len=128, seed=0)
  iterator = iter(batches)        # next(iterator); iterator.get_state() / set_state(state)
"""
from rlhf_jax.data import builders
from rlhf_jax.data import encoding
from rlhf_jax.data import formats
from rlhf_jax.data import gold_labeler
from rlhf_jax.data import labelers
from rlhf_jax.data import loaders
from rlhf_jax.data import offline_dataset
from rlhf_jax.data import offline_task
from rlhf_jax.data import packing
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.data.builders import build_dataset, build_datasets, load_source
from rlhf_jax.data.loaders import comparison_loader, prompt_loader, ptx_loader, sft_loader
from rlhf_jax.data.tokenizer import load_tokenizer
