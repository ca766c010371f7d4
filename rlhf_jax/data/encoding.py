"""Pure functions from token ids to fixed-shape numpy examples, one per kind of data.

Conventions shared by every batch the loaders produce:
  * `segment_ids`: 0 on padding, 1, 2, 3, ... numbering the documents of a row (causal attention
    only within a segment).
  * `positions`: index of the token within its document (0 at its first token, 0 on padding).
  * `loss_mask` (and `response_mask`) are aligned with the TOKENS AS TARGETS: `loss_mask[t] = 1`
    means token t is predicted from position t-1 of the same document. So the next-token loss is
    `CE(logits[:, :-1], tokens[:, 1:])` weighted by `loss_mask[:, 1:]`. The mask is zero on the bos
    token, on prompt tokens, on padding, and on the first token of every document, so no loss ever
    crosses a document boundary.
"""
import numpy as np

RANK_PAD = -1  # rank of a missing response (check `response_valid`, never the rank itself)


def _with_bos(ids, bos_id):
  if bos_id is None:
    return np.asarray(ids, np.int32)
  return np.concatenate([np.asarray([bos_id], np.int32), np.asarray(ids, np.int32)])


def sft_document(prompt_ids, response_ids, bos_id, eos_id, seq_len):
  """One demonstration `[bos] prompt response [eos]`, cut to at most `seq_len` tokens.

  Returns {'tokens': int32 (L,), 'loss_mask': float32 (L,)}, the mask 1 on response tokens and
  eos, or None when not one response token fits in `seq_len` (the prompt fills it).
  """
  head = _with_bos(prompt_ids, bos_id)
  tail = np.concatenate([np.asarray(response_ids, np.int32), np.asarray([eos_id], np.int32)])
  tokens = np.concatenate([head, tail])[:seq_len]
  mask = np.concatenate([np.zeros(len(head), np.float32), np.ones(len(tail), np.float32)])
  mask = mask[:seq_len]
  mask[:1] = 0.0  # the first token of a document is never a target
  if not mask.any():
    return None
  return {"tokens": tokens, "loss_mask": mask}


def ptx_chunks(text_ids, bos_id, eos_id, seq_len, max_chunks):
  """A pretraining document `[bos] text [eos]` split into chunks of at most `seq_len` tokens.

  Each chunk becomes its own segment; its loss mask is 1 everywhere but its first token.
  Documents longer than `max_chunks * seq_len` tokens are cut there.
  """
  ids = np.concatenate([_with_bos(text_ids, bos_id), np.asarray([eos_id], np.int32)])
  chunks = []
  for start in range(0, min(len(ids), max_chunks * seq_len), seq_len):
    tokens = ids[start:start + seq_len]
    if len(tokens) < 2:
      break  # a lone token has nothing to predict
    mask = np.ones(len(tokens), np.float32)
    mask[0] = 0.0
    chunks.append({"tokens": tokens, "loss_mask": mask})
  return chunks


def right_pad_document(doc, seq_len, pad_id):
  """One document as a right-padded row: tokens, segment_ids, positions, loss_mask, last_index."""
  length = len(doc["tokens"])
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:length] = doc["tokens"]
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:length] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[:length] = np.arange(length, dtype=np.int32)
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[:length] = doc["loss_mask"]
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "loss_mask": loss_mask, "last_index": np.int32(length - 1)}


def comparison_rows(prompt_ids, responses_ids, ranks, bos_id, eos_id, pad_id, seq_len, k_max,
                    ended=None):
  """K responses to one prompt as K_max right-padded rows `[bos] prompt response [eos] pad...`.

  `ended` (K bools, default all True): a response sampled without reaching EOS gets no eos, so
  the reward is read at its last token, as PPO reads it.

  When a row would not fit, the prompt loses tokens from its left (the same number in every row,
  bos is kept) until the longest response fits, but keeps at least half the row; a response that
  still does not fit loses its tail (and its eos).
  Missing responses (K < k_max) are all-padding rows with `response_valid` 0 and rank RANK_PAD.

  Returns tokens, segment_ids, positions, response_mask (K_max, T); lengths, last_index, ranks,
  response_valid (K_max,).
  """
  k = len(responses_ids)
  ended = [True] * k if ended is None else [bool(e) for e in ended]
  tails = [np.concatenate([np.asarray(r, np.int32), np.asarray([eos_id] if e else [], np.int32)])
           for r, e in zip(responses_ids, ended)]
  n_bos = 0 if bos_id is None else 1
  prompt_ids = np.asarray(prompt_ids, np.int32)
  room = max(seq_len - n_bos - max(len(t) for t in tails), (seq_len - n_bos) // 2)
  prompt_ids = prompt_ids[len(prompt_ids) - min(room, len(prompt_ids)):]
  head = _with_bos(prompt_ids, bos_id)
  tokens = np.full((k_max, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((k_max, seq_len), np.int32)
  positions = np.zeros((k_max, seq_len), np.int32)
  response_mask = np.zeros((k_max, seq_len), np.float32)
  lengths = np.zeros(k_max, np.int32)
  for i, tail in enumerate(tails):
    row = np.concatenate([head, tail])[:seq_len]
    n = len(row)
    tokens[i, :n] = row
    segment_ids[i, :n] = 1
    positions[i, :n] = np.arange(n, dtype=np.int32)
    response_mask[i, len(head):n] = 1.0
    response_mask[i, 0] = 0.0
    lengths[i] = n
  padded_ranks = np.full(k_max, RANK_PAD, np.int32)
  padded_ranks[:k] = ranks
  valid = np.zeros(k_max, np.float32)
  valid[:k] = 1.0
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "response_mask": response_mask, "lengths": lengths,
          "last_index": np.maximum(lengths - 1, 0).astype(np.int32), "ranks": padded_ranks,
          "response_valid": valid}


def prompt_row(prompt_ids, bos_id, pad_id, prompt_len):
  """A prompt `[bos] prompt` left-padded to `prompt_len`; a long prompt keeps its right end.

  Returns tokens, segment_ids (1 on real tokens), positions (0 at the first real token) of shape
  (prompt_len,) and the scalar `lengths` (number of real tokens).
  """
  n_bos = 0 if bos_id is None else 1
  prompt_ids = np.asarray(prompt_ids, np.int32)
  keep = min(len(prompt_ids), prompt_len - n_bos)
  ids = _with_bos(prompt_ids[len(prompt_ids) - keep:], bos_id)
  n = len(ids)
  tokens = np.full(prompt_len, pad_id, np.int32)
  segment_ids = np.zeros(prompt_len, np.int32)
  positions = np.zeros(prompt_len, np.int32)
  if n:
    tokens[-n:] = ids
    segment_ids[-n:] = 1
    positions[-n:] = np.arange(n, dtype=np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "lengths": np.int32(n)}
