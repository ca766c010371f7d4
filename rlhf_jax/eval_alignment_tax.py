"""The alignment tax of a model: its loss on held-out pretraining text and the capability probe.

The probe (offline task): greedy continuations of the probe prompts "the list fig pear kiwi has"
(`probe_new_tokens` tokens) scored by `gold_labeler.probe_score`; only the pretraining text teaches
this skill, so a drop from the base model is what RLHF costs and what the ptx term restores.
"""
import os

import numpy as np

from rlhf_jax import rollout
from rlhf_jax.data import builders, gold_labeler, loaders, offline_dataset
from rlhf_jax.errors import UserError
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import sft
from rlhf_jax.train import stage_io


def pretrain_batches(config, tfds_dir, tok, mesh):
  """The first `pretrain_batches` packed held-out pretraining batches, or None when the data has
  no pretraining text."""
  e = config.eval
  if not e.pretrain_batches or not builders.RlhfPtx(data_dir=tfds_dir).is_prepared():
    return None
  rollout.batch_size_check(e.pretrain_batch_size, mesh, "eval.pretrain_batch_size")
  source = stage_io.load_split(tfds_dir, "ptx", config.data.eval_split, "eval_split")
  out = []
  for batch in loaders.ptx_loader(source, tok, batch_size=e.pretrain_batch_size,
                                  seq_len=e.pretrain_seq_len, num_epochs=1, shuffle=False,
                                  shard=(0, 1)):
    out.append({k: batch[k] for k in ("tokens", "segment_ids", "positions", "loss_mask")})
    if len(out) == e.pretrain_batches:
      break
  if not out:
    raise UserError(f"config.eval.pretrain_batch_size: the held-out pretraining text does not fill "
                    f"one batch of {e.pretrain_batch_size} x {e.pretrain_seq_len} tokens")
  return out


def probe_prompts(config, tfds_dir):
  """The first `eval.probe_prompts` (0 = all) capability-probe prompts of the offline task, or
  None with other data."""
  if config.data.source != "offline":
    return None
  prompts = offline_dataset.read_probe(os.path.dirname(tfds_dir))
  if prompts is not None and config.eval.probe_prompts:
    prompts = prompts[:config.eval.probe_prompts]
  return prompts


class AlignmentTax:
  """The held-out pretraining batches and the probe prompts, read once; `pretrain_loss` and
  `probe` of any model of the SFT model's shape. `texts` keeps each probed model's continuations."""

  def __init__(self, config, tfds_dir, tok, cfg, mesh, key):
    e = config.eval
    self.cfg, self.mesh, self.tok, self.key, self.batch_size = cfg, mesh, tok, key, e.batch_size
    self.ptx = pretrain_batches(config, tfds_dir, tok, mesh)
    self.prompts = probe_prompts(config, tfds_dir)
    self.batches = None if not self.prompts else list(rollout.prompt_batches(
        [{"prompt": p} for p in self.prompts], tok, e.batch_size, e.prompt_len))
    self.sc = SamplingConfig(max_new_tokens=e.probe_new_tokens, greedy=True,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    self.lm_loss = rollout.JittedOnMesh(sft.make_eval_fn(cfg), mesh)
    self.texts = {}

  def pretrain_loss(self, params):
    """Mean token NLL on the held-out pretraining batches, or None."""
    if self.ptx is None:
      return None
    total = count = 0.0
    for batch in self.ptx:
      loss_sum, n = self.lm_loss(params, batch)
      total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)

  def probe(self, name, params, bar):
    """Mean `probe_score` of the greedy continuations of the probe prompts, or None."""
    if self.batches is None:
      return None
    texts = [None] * len(self.prompts)
    for batch in self.batches:
      out = rollout.sample_batch(params, self.cfg, batch, self.mesh, self.batch_size, self.key,
                                 self.sc, 1)
      valid = batch["index"] >= 0
      t, _ = rollout.decode_responses(self.tok, out["tokens"][valid], out["lengths"][valid])
      for i, text in zip(batch["index"][valid], t):
        texts[int(i)] = text
      bar.update(1)
    self.texts[name] = texts
    return float(np.mean([gold_labeler.probe_score(p, t)
                          for p, t in zip(self.prompts, texts)]))
