"""What PPO, collect, evaluate and SFT's selection by RM share: sample, append, score, decode.

Sample K responses per prompt, append them to the prompt, score them at the last token with a
scalar-head model, take per-token log-probs, decode ids to text, place parameters on the mesh.
"""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import logprobs
from rlhf_jax import losses
from rlhf_jax import sharding
from rlhf_jax.data import loaders
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig
from rlhf_jax.sampling import sample
from rlhf_jax.train import logs
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import forward, jit_eval_step


# ----------------------------------------------------------------------------- text

def response_ids(tokens, length, eos_id):
  """The generated ids of one row without its EOS: tokens[:length], the last dropped if EOS."""
  ids = [int(t) for t in tokens[:length]]
  if ids and ids[-1] == eos_id:
    ids = ids[:-1]
  return ids


def decode_response(tok, tokens, length):
  """The text of one generated row: its first `length` ids, up to (excluding) EOS."""
  return tok.decode(response_ids(tokens, length, tok.eos_id))


def decode_responses(tok, tokens, lengths):
  """Texts of the generated rows (cut at EOS) and whether each row ended with EOS."""
  texts, ended = [], []
  for row, length in zip(tokens, lengths):
    ended.append(int(length) > 0 and int(row[int(length) - 1]) == tok.eos_id)
    texts.append(decode_response(tok, row, int(length)))
  return texts, np.asarray(ended)


def prompt_text(tok, ids):
  """The text of a left-padded prompt row `[pad.. bos] prompt` (pad and bos ids dropped)."""
  return tok.decode([int(t) for t in ids if int(t) not in (tok.pad_id, tok.bos_id)])


def episode_texts(tok, tokens, lengths, prompt_len):
  """[(prompt text, response text)] of (B, P + N) rows: the prompt without pad/bos, the response
  up to (excluding) EOS."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  return [(prompt_text(tok, row[:prompt_len]), decode_response(tok, row[prompt_len:], int(n)))
          for row, n in zip(tokens, lengths)]


# ----------------------------------------------------------------------------- placement

def to_host(tree, mesh):
  """Device arrays -> numpy; with several processes they are gathered (replicated) first."""
  if jax.process_count() > 1:
    tree = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(tree)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def batch_size_check(batch_size, mesh, field):
  """One-line UserError naming `config.<field>` when `batch_size` does not fit the mesh."""
  try:
    sharding.check_batch_size(batch_size, mesh, field)
  except UserError as e:
    raise UserError(f"config.{e}") from None


def global_rows(batch, mesh, batch_size):
  """A full host batch (every process holds all rows) -> global arrays sharded over the batch."""
  rows = sharding.process_batch_rows(mesh, batch_size)
  return sharding.global_batch({k: batch[k][rows] for k in ("tokens", "segment_ids")}, mesh,
                               batch_size)


# ----------------------------------------------------------------------------- sampling

def split_prompts(tfds_dir, split, field, limit):
  """The first `limit` (0 = all) prompt records of one split, as dicts."""
  source = stage_io.load_split(tfds_dir, "prompts", split, field)
  n = len(source) if not limit else min(limit, len(source))
  return [{"prompt": loaders.text_of(source[i]["prompt"])} for i in range(n)]


def prompt_batches(records, tok, batch_size, prompt_len):
  """Fixed-shape host batches of left-padded prompts `pad... [bos] prompt` over `records` in order.

  Yields dicts tokens, segment_ids (batch_size, prompt_len) and index (batch_size,), the record
  index (-1 on the padding rows of the last batch).
  """
  return loaders.prompt_loader(records, tok, batch_size=batch_size, prompt_len=prompt_len,
                               num_epochs=1, shuffle=False, drop_remainder=False, shard=(0, 1))


def sample_batch(params, cfg, batch, mesh, batch_size, rng, sc, num_samples):
  """K samples per prompt of one host prompt batch; numpy tokens, mask, lengths (B*K, ...)."""
  prompts = global_rows(batch, mesh, batch_size)
  with sharding.activate(mesh):
    out = sample(params, cfg, prompts["tokens"], prompts["segment_ids"], rng, sc,
                 num_samples=num_samples)
  return to_host({"tokens": out.tokens, "mask": out.mask, "lengths": out.lengths}, mesh)


def progress(total, desc):
  """The progress of a sampling run over `total` prompt batches (process 0 only): a tqdm bar on
  a terminal, else a line every tenth of the way (`logs.progress`)."""
  return logs.progress(total, desc, enabled=jax.process_index() == 0)


# ----------------------------------------------------------------------------- prompt ++ response

def append_responses(prompt_tokens, prompt_seg, response_tokens, response_mask):
  """(tokens, segment_ids) of prompt ++ response rows: the segment id is 1 on the response tokens
  up to EOS (mask > 0), the prompt's own elsewhere. Host (numpy) rows stay on the host; device
  arrays and tracers give jax arrays."""
  xp = np if isinstance(prompt_tokens, np.ndarray) and isinstance(response_tokens, np.ndarray) \
      else jnp
  tokens = xp.concatenate([prompt_tokens, response_tokens], axis=1)
  seg = xp.concatenate([prompt_seg, (response_mask > 0).astype(xp.int32)], axis=1)
  return tokens, seg


def last_response_index(prompt_len, lengths):
  """The column of each row's last response token in prompt ++ response rows:
  prompt_len + max(length, 1) - 1 (the sampler's lengths are >= 1; EOS included)."""
  xp = np if isinstance(lengths, np.ndarray) else jnp
  return prompt_len + xp.maximum(lengths, 1) - 1


def sequences(prompt_tokens, prompt_seg, out, num_samples):
  """Host prompt ++ response rows for scoring (each prompt repeated `num_samples` times, `out` the
  host sampler output): tokens, segment_ids (1 on prompt and response tokens up to EOS),
  last_index (the last response token)."""
  tokens, seg = append_responses(np.repeat(prompt_tokens, num_samples, 0),
                                 np.repeat(prompt_seg, num_samples, 0), out["tokens"], out["mask"])
  return {"tokens": tokens.astype(np.int32), "segment_ids": seg,
          "last_index": last_response_index(prompt_tokens.shape[1], out["lengths"])}


# ----------------------------------------------------------------------------- scoring

def scores_at(cfg, params, rows, last_index, *, rng=None, train=False, head_from=0):
  """The scalar head of `cfg` on `rows` (tokens, segment_ids[, positions]) read at `last_index`
  (N,): the reward of each row at its last token. head_from: the head (and with unrolled layers
  the last layer) only from that column on, every last_index being >= it."""
  values = forward(cfg, "scalar", params, rows, rng=rng, train=train, head_from=head_from)
  return losses.gather_last(values, last_index - head_from)


def last_token_scores(cfg, params, tokens, segment_ids, prompt_len, lengths):
  """The scalar-head model's score of each (prompt, response) row at the response's last token
  (column >= prompt_len: the head from there on)."""
  return scores_at(cfg, params, {"tokens": tokens, "segment_ids": segment_ids},
                   last_response_index(prompt_len, lengths), head_from=prompt_len)


def make_reward_fn(cfg):
  """(params, batch) -> (B,) scalar head at `batch['last_index']` (rows from `sequences`)."""

  def fn(params, batch):
    return scores_at(cfg, params, {"tokens": batch["tokens"], "segment_ids": batch["segment_ids"]},
                     batch["last_index"])
  return fn


class JittedOnMesh:
  """A jitted (params, host batch) function compiled on its first call: every process passes the
  whole batch, its rows are sharded over the mesh, the outputs come back as numpy."""

  def __init__(self, fn, mesh):
    self.fn, self.mesh, self.step = fn, mesh, None

  def __call__(self, params, host_batch):
    size = len(next(iter(host_batch.values())))
    rows = sharding.process_batch_rows(self.mesh, size)
    local = {k: v[rows] for k, v in host_batch.items()}
    if self.step is None:
      self.step = jit_eval_step(self.fn, jax.tree.map(lambda x: x.sharding, params),
                                local, self.mesh)
    with sharding.activate(self.mesh):
      out = self.step(params, sharding.global_batch(local, self.mesh, size))
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)


# ----------------------------------------------------------------------------- log-probs

def response_outputs(cfg: ModelConfig, head, params, tokens, segment_ids, prompt_len):
  """The model's outputs at the N positions that predict the response tokens.

  tokens (B, P + N) = left-padded prompt then response; the output at column P - 1 + t belongs to
  response token t: the logits that predict it (head 'lm'), or the value of the state before it
  (head 'scalar'). Returns (B, N, V) or (B, N).
  """
  out = forward(cfg, head, params, {"tokens": tokens, "segment_ids": segment_ids},
                head_from=prompt_len - 1)   # the head where it is needed (the LM head is
  return out[:, :-1]                        # a third of a small model's FLOPs)


def policy_logprobs(cfg, params, tokens, segment_ids, prompt_len, temperature):
  """(log pi(y_t), entropy_t), each (B, N), at the sampling temperature (the head from column
  P - 1 on, as `response_outputs`; its logits in chunks when cfg.logits_chunk)."""
  return logprobs.next_token_logprobs(cfg, params, {"tokens": tokens, "segment_ids": segment_ids},
                                      temperature, head_from=prompt_len - 1)


def make_logprob_fn(cfg, num_new, temperature):
  """(params, batch) -> (B, num_new) log-probs of the last `num_new` tokens of `batch['tokens']`
  (prompt ++ response), each predicted from the position before it. Unlike `policy_logprobs` the
  LM head runs at every position (the numbers evaluation has always reported)."""

  def fn(params, batch):
    width = batch["tokens"].shape[1]
    if cfg.logits_chunk:   # the head from the first predicting position on, in chunks
      return logprobs.next_token_logprobs(cfg, params, batch, temperature,
                                          head_from=width - num_new - 1)[0]
    logits = forward(cfg, "lm", params, batch)
    return losses.token_logprobs(logits[:, width - num_new - 1:width - 1],
                                 batch["tokens"][:, width - num_new:], temperature)[0]
  return fn
