"""An external judge for the evaluation on data without a gold labeler (HH-RLHF, TL;DR).

`config.eval.judge` names a reward model that did not train the policies: one of ours (a
`<workdir>/rm/model` of another run) or a Hugging Face `*ForSequenceClassification` directory
(read by `rlhf_jax.convert.load_model` through `rlhf_jax.models.hf_reward`, e.g. a TRL or OpenRLHF
reward model). It scores the decoded texts with ITS OWN tokenizer, so it need not share the
policy's: each (prompt, response) becomes the row `[bos] prompt response [eos]` the reward model
stage trains on (`encoding.comparison_rows` with K = 1: a prompt that does not fit loses tokens
on its left), read at its last token.
"""
import os

import numpy as np

from rlhf_jax import rollout
from rlhf_jax.convert import load_model
from rlhf_jax.data import encoding
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.errors import UserError


def judge_rows(tok, pairs, seq_len):
  """Right-padded rows tokens, segment_ids, last_index of (prompt, response) texts."""
  rows = [encoding.comparison_rows(tok.encode(p), [tok.encode(r)], [0], tok.bos_id, tok.eos_id,
                                   tok.pad_id, seq_len, 1) for p, r in pairs]
  return {k: np.concatenate([r[k] for r in rows]) for k in ("tokens", "segment_ids",
                                                             "last_index")}


class Judge:
  """The judge reward model on the mesh, its tokenizer and a jitted scorer of fixed shape."""

  def __init__(self, path, mesh, seq_len, batch_size):
    if not os.path.exists(path):
      raise UserError(f"config.eval.judge: {path} does not exist (expected a reward model "
                      "directory: ours or a Hugging Face *ForSequenceClassification one)")
    try:
      model = load_model(path, mesh=mesh)
    except UserError as e:
      raise UserError(f"config.eval.judge: {e}") from None
    if model.head != "scalar":
      raise UserError(f"config.eval.judge: {path} holds a model with a {model.head!r} head; "
                      "expected a reward model (scalar head)")
    if not model.tokenizer_dir or not os.path.isdir(model.tokenizer_dir):
      raise UserError(f"config.eval.judge: {path} has no tokenizer (expected its tokenizer files "
                      "next to the weights)")
    self.path = os.path.abspath(path)
    self.tok = load_tokenizer(model.tokenizer_dir)
    self.cfg = model.cfg.replace(dropout_resid=0.0, dropout_attn=0.0)
    self.params = model.params
    self.seq_len = min(seq_len, self.cfg.max_len)
    self.batch_size = batch_size
    self.score_fn = rollout.JittedOnMesh(rollout.make_reward_fn(self.cfg), mesh)

  def scores(self, pairs):
    """The judge's score of each (prompt, response) text pair, (N,) float64."""
    out = []
    for start in range(0, len(pairs), self.batch_size):
      chunk = list(pairs[start:start + self.batch_size])
      n = len(chunk)
      chunk += [chunk[-1]] * (self.batch_size - n)      # fixed shape: pad with a repeat
      out.append(np.asarray(self.score_fn(self.params, judge_rows(self.tok, chunk,
                                                                  self.seq_len))[:n], np.float64))
    return np.concatenate(out) if out else np.zeros(0)
