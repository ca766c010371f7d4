"""PPO against the offline task's gold labeler (stage `ppo_oracle`, `config.reward_model = 'gold'`).

The gold labeler is a Python function of the decoded prompt and response, so the jitted iteration
calls it on the host through `jax.pure_callback` (`gold_score_fn`). Its reward is normalised like
the reward model's (`gold_reward_norm`): scale x (gold - shift), by default with the mean and
1 / standard deviation of the gold score of the SFT samples the collect stage ranked.
"""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import collect
from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.data import encoding, gold_labeler, loaders, offline_task
from rlhf_jax.errors import UserError


def is_gold(config):
  """True when the reward is the offline task's gold labeler (`config.reward_model = 'gold'`)."""
  return config.get("reward_model") == "gold"


def gold_reward_scale(config):
  return config.ppo.get("gold_reward_scale", 0.0)


def gold_reward_norm(config, workdir):
  """(shift, scale) of the oracle reward scale x (gold - shift): with gold_reward_scale 0, the
  mean and 1 / standard deviation of the gold score of the SFT samples of the collect stage's
  train split (the reward model's normalisation: SFT samples with unit spread); else (0, scale)."""
  scale = float(gold_reward_scale(config))
  if scale:
    return 0.0, scale
  path = os.path.join(collect.collect_dir(workdir), collect.DONE_FILE)
  if not os.path.exists(path):
    raise UserError(f"config.ppo.gold_reward_scale: 0 normalises the gold reward by the collect "
                    f"stage's statistics, but {path} does not exist; run collect or set a scale")
  with open(path, encoding="utf-8") as f:
    stats = json.load(f)["splits"].get(config.data.train_split, {})
  std = stats.get("gold_score_std") or 0.0
  if not std > 0:
    raise UserError(f"config.ppo.gold_reward_scale: {path} records no spread of the gold score "
                    "of the SFT samples; set a scale")
  return float(stats["mean_gold_score"]), 1.0 / std


def gold_score_fn(tok, scale=1.0, shift=0.0):
  """A `make_iteration` score_fn: scale x (`gold_labeler.gold_score(prompt, response)` - shift) of
  the decoded texts, computed on the host by `jax.pure_callback`, row by row.

  One process: the callback sees the whole batch. Several processes (no process can see another's
  rows): the callback runs inside a `shard_map` over the batch axes of the active mesh, each
  device scoring its own rows on its own host; the scores are the same numbers (each row's score
  depends on that row only)."""

  def host(tokens, lengths, prompt_len):
    episodes = rollout.episode_texts(tok, tokens, lengths, prompt_len)
    return np.asarray([scale * (gold_labeler.gold_score(q, a) - shift) for q, a in episodes],
                      np.float32)

  def score_fn(tokens, lengths, prompt_len):
    def call(t, n):
      return jax.pure_callback(functools.partial(host, prompt_len=prompt_len),
                               jax.ShapeDtypeStruct(n.shape, jnp.float32), t, n,
                               vmap_method="sequential")
    mesh = jax.sharding.get_abstract_mesh()
    if jax.process_count() == 1 or mesh.empty:
      return call(tokens, lengths)
    rows = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    if tokens.shape[0] % rows:
      raise UserError(f"config.reward_model 'gold' on {jax.process_count()} processes: the "
                      f"rollout's {tokens.shape[0]} rows per micro-batch must divide over the "
                      f"mesh's data x fsdp = {rows} devices")
    spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
    return jax.shard_map(call, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                         check_vma=False)(tokens, lengths)
  return score_fn


def check_gold_prompts(prompt_source, tok, prompt_len):
  """Every training prompt, as the iteration sees it (encoded, cut to prompt_len, decoded), must
  be the same offline-task instruction, else the gold labeler cannot score it: a one-line
  UserError now instead of an error inside the jitted iteration."""
  for i in range(len(prompt_source)):
    text = loaders.text_of(prompt_source[i]["prompt"])
    row = encoding.prompt_row(tok.encode(text), tok.bos_id, tok.pad_id, prompt_len)
    parsed = offline_task.parse_prompt(text)
    seen = offline_task.parse_prompt(rollout.prompt_text(tok, row["tokens"]))
    if parsed is None or seen != parsed:
      raise UserError(f"config.reward_model 'gold': prompt {i} ({text[:50]!r}) is not an "
                      f"offline-task instruction once encoded into config.ppo.prompt_len "
                      f"({prompt_len}) tokens")


def gold_reward(config, workdir, prompt_source, tok):
  """(score_fn, {'scale', 'shift'}) of the oracle run, or (None, None) with a reward model."""
  if not is_gold(config):
    return None, None
  check_gold_prompts(prompt_source, tok, config.ppo.prompt_len)
  shift, scale = gold_reward_norm(config, workdir)
  return gold_score_fn(tok, scale, shift), {"scale": scale, "shift": shift}
