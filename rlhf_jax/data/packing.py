"""Packing of variable-length documents into fixed-length rows, and unpacking for inspection.

A packed row holds several documents one after another, then padding:
  tokens       int32   the documents' tokens, `pad_id` on padding
  segment_ids  int32   1, 2, 3, ... per document, 0 on padding (no attention across documents)
  positions    int32   index within the document, restarting at 0 in each (0 on padding)
  loss_mask    float32 aligned with tokens as targets (see `encoding`), 0 on padding
Packing is grain's first-fit packing, so it is deterministic and its iterator state checkpoints.
"""
import grain
import numpy as np

PACKED_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def _rename_packed(element):
  """grain names packing outputs `<feature>_segment_ids` / `_positions`; use our names."""
  return {"tokens": element["tokens"].astype(np.int32),
          "segment_ids": element["tokens_segment_ids"].astype(np.int32),
          "positions": element["tokens_positions"].astype(np.int32),
          "loss_mask": element["loss_mask"].astype(np.float32)}


def pack_documents(documents, seq_len, pad_id, num_bins):
  """Packs an IterDataset of {'tokens', 'loss_mask'} documents (each <= seq_len) into rows.

  Args:
    documents: grain IterDataset of dicts with 1-D `tokens` (int32) and `loss_mask` (float32).
    seq_len: length of a packed row.
    pad_id: token id written on padding.
    num_bins: rows filled at once by first-fit (more bins, less padding).

  Returns:
    A grain IterDataset of rows with the keys of PACKED_KEYS, each of shape (seq_len,).
  """
  packed = grain.experimental.FirstFitPackIterDataset(
      documents,
      length_struct={"tokens": seq_len, "loss_mask": seq_len},
      num_packing_bins=num_bins,
      shuffle_bins=False,
      padding_struct={"tokens": pad_id, "loss_mask": 0.0},
  )
  return packed.map(_rename_packed)


def unpack_row(row):
  """Splits one packed row (dict of 1-D arrays) into its documents, in order.

  Returns a list of dicts with the row's keys, holding only that document's positions.
  """
  segment_ids = np.asarray(row["segment_ids"])
  documents = []
  for segment in np.unique(segment_ids[segment_ids > 0]):
    where = segment_ids == segment
    documents.append({key: np.asarray(value)[where] for key, value in row.items()
                      if np.ndim(value) == 1 and len(value) == len(segment_ids)})
  return documents
