"""DPO stage: the step (one forward per response, reference log-probs in the step) equals the
chosen/rejected way pair by pair (loss and parameter gradients), gradient accumulation and the
reference's micro-batches are exact on a sharded mesh, bad config values are one-line errors, and
the stage runs on the offline comparisons (slow)."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import config_files, sharding
from rlhf_jax.convert import save_model
from rlhf_jax.errors import UserError
from rlhf_jax.models import Transformer, get_model_config, init_params
from rlhf_jax.train import dpo, loop, optim, stage_io
from stage_steps import assert_same_training, sgd

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def dpo_batch(seed, batch=8, k_max=4, seq_len=14, vocab=512):
  """Random (B, K_max, T) comparisons like comparison_loader's, with response masks: K in
  2..k_max, ties, padding responses, rows of different lengths."""
  rng = np.random.default_rng(seed)
  shape = (batch, k_max, seq_len)
  tokens, seg, pos = (np.zeros(shape, np.int32) for _ in range(3))
  mask = np.zeros(shape, np.float32)
  ranks = np.full((batch, k_max), -1, np.int32)
  valid = np.zeros((batch, k_max), np.float32)
  for b in range(batch):
    k = int(rng.integers(2, k_max + 1))
    prompt = rng.integers(3, vocab, size=int(rng.integers(2, 6)))
    r = rng.integers(0, k, size=k)
    if len(set(r.tolist())) < 2:
      r[0], r[1] = 0, 1
    ranks[b, :k], valid[b, :k] = r, 1.0
    for j in range(k):
      n = int(rng.integers(len(prompt) + 1, seq_len + 1))
      row = np.concatenate([prompt, rng.integers(3, vocab, size=n - len(prompt))])
      tokens[b, j, :n], seg[b, j, :n], pos[b, j, :n] = row, 1, np.arange(n)
      mask[b, j, len(prompt):n] = 1.0
  return {"tokens": tokens, "segment_ids": seg, "positions": pos, "response_mask": mask,
          "ranks": ranks, "response_valid": valid}


def naive_pairwise(cfg, params, ref_params, batch, beta):
  """The chosen/rejected way: each pair (w, l) forwards its two responses, one model call per
  response and model (one jitted function of fixed shape); loss = mean over prompts of
  -1/C(K,2) sum log sigmoid(beta ((logpi_w - logref_w) - (logpi_l - logref_l))), gradients summed
  pair by pair."""
  model = Transformer(cfg, head="lm")

  def row_logp(p, row):
    tokens, seg, pos, mask = row
    logits, _ = model.apply({"params": p}, tokens[None], segment_ids=seg[None],
                            positions=pos[None])
    lp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(lp, tokens[1:, None], axis=-1)[:, 0] * mask[1:])

  @jax.jit
  def pair(p, ref, w, l, weight):
    def loss(q):
      z = beta * ((row_logp(q, w) - row_logp(ref, w)) - (row_logp(q, l) - row_logp(ref, l)))
      return -jax.nn.log_sigmoid(z) * weight
    return jax.value_and_grad(loss)(p)

  prompts = batch["tokens"].shape[0]
  total, grads = 0.0, jax.tree.map(np.zeros_like, params)
  for b in range(prompts):
    k = int(batch["response_valid"][b].sum())
    rows = [tuple(batch[key][b, j] for key in ("tokens", "segment_ids", "positions",
                                                 "response_mask")) for j in range(k)]
    for w, l in itertools.permutations(range(k), 2):
      if batch["ranks"][b, w] >= batch["ranks"][b, l]:
        continue
      loss, g = pair(params, ref_params, rows[w], rows[l], 1.0 / (k * (k - 1) / 2) / prompts)
      total += float(loss)
      grads = jax.tree.map(lambda a, x: a + np.asarray(x, np.float64), grads, g)
  return total, grads


@pytest.mark.slow   # 2 min on the shared 2-core machine at load 30 (one compile, 20 pair calls)
def test_dpo_loss_equals_naive_chosen_rejected_pairs():
  cfg = get_model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  ref_params = init_params(cfg, jax.random.key(1))     # another model: log-ratios far from 0
  batch = jax.tree.map(jnp.asarray, dpo_batch(1, batch=2, k_max=4, seq_len=12))
  beta = 0.5
  ref_logp = dpo.response_logprobs(cfg, ref_params, batch)
  loss_fn = dpo.make_loss_fn(cfg, beta)

  def ours(p):
    s, c, _ = loss_fn(p, {**batch, "ref_logp": ref_logp}, jax.random.key(0))
    return s / c

  loss, grads = jax.jit(jax.value_and_grad(ours))(params)
  ref_loss, ref_grads = naive_pairwise(cfg, params, ref_params, jax.device_get(batch), beta)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-6)


def _dpo_config(**overrides):
  config = config_files.get_config(os.path.join(ROOT, "configs", "dpo.py"), "tiny")
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def _run_dpo_steps(mesh, accum, steps=2, batch_size=8):
  """`steps` DPO steps (DpoStep: reference log-probs in the step) with SGD on `mesh`."""
  cfg = get_model_config("tiny")
  init = jax.device_get(init_params(cfg, jax.random.key(0)))
  ref = jax.device_get(init_params(cfg, jax.random.key(1)))
  config = ml_collections.ConfigDict({"beta": 0.5, "grad_accum_steps": accum,
                                      "batch_size": batch_size})
  tx = sgd()
  shardings = optim.state_shardings(cfg, "lm", tx, mesh)
  state = optim.create_state(init, tx, shardings)
  step = dpo.DpoStep(config, cfg, tx, lambda count: 0.1, mesh,
                     jax.device_put(ref, shardings["params"]))
  metrics = []
  for i in range(steps):
    state, m = step(state, dpo_batch(20 + i, batch=batch_size), jax.random.key(i))
    metrics.append(jax.device_get(m))
  return jax.device_get(state["params"]), metrics, init


@pytest.mark.slow   # 77 s on the shared 2-core machine at load 30 (two meshes, two compiles each)
def test_sharded_accumulated_step_equals_single_device():
  """2 micro-batches (of the train step and of the reference's forward) on a (2, 2, 2) mesh ==
  the whole batch on one device."""
  ref_params, ref_metrics, init = _run_dpo_steps(
      sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), accum=1)
  params, metrics, _ = _run_dpo_steps(sharding.make_mesh((2, 2, 2)), accum=2)
  assert ref_metrics[0]["loss"] > 0 and ref_metrics[0]["pairs_sum"] > 0
  assert_same_training(params, metrics, ref_params, ref_metrics, init,
                       keys=("loss", "correct_sum", "logratio_sum"))


@pytest.mark.parametrize("field,value,message", [
    ("beta", 0.0, "config.beta must be a number > 0, got 0.0"),
    ("beta", -0.1, "config.beta must be a number > 0, got -0.1"),
    ("k_max", 1, "config.k_max must be an integer >= 2 (or 0: the largest K in the data), got 1"),
])
def test_bad_dpo_config_values_are_one_line_errors(field, value, message):
  config = _dpo_config()
  with config.unlocked():
    config[field] = value
  with pytest.raises(UserError) as e:
    stage_io.validate_config(config)
  assert str(e.value) == message


@pytest.mark.slow   # ~20 s: compiles the DPO step, the reference forward and the evaluation
def test_dpo_stage_on_the_offline_comparisons(tmp_path, offline_data_dir):
  """The stage from a (random) SFT model on the offline task's comparisons: the held-out
  implicit-reward accuracy is exactly 0.5 at step 0 (policy == reference), the final model is a
  language model of the same shape, and a second run skips the finished stage."""
  cfg = get_model_config("tiny", num_layers=1)
  sft = str(tmp_path / "sft_model")
  save_model(sft, cfg, jax.device_get(init_params(cfg, jax.random.key(0))), fmt="rlhf_jax",
             tokenizer_dir=os.path.join(offline_data_dir, "tokenizer"))
  config = _dpo_config(**{"data.dir": offline_data_dir, "data.prefetch": 0, "init_from": sft,
                          "model.num_layers": 1, "num_steps": 4, "eval_every": 2,
                          "eval_batches": 1, "log_every": 2, "checkpoint_every": 2,
                          "batch_size": 8, "eval_batch_size": 8})
  stage_io.validate_config(config)
  path = dpo.run(config, str(tmp_path / "run"))
  assert path == str(tmp_path / "run" / "dpo" / "model")
  with open(os.path.join(path, stage_io.STAGE_META)) as f:
    meta = json.load(f)
  assert meta["stage"] == "dpo" and meta["steps"] == 4 and meta["beta"] == 0.1
  assert meta["reference"] == sft and meta["first_eval"]["accuracy"] == 0.5
  assert 0.0 <= meta["final_eval"]["accuracy"] <= 1.0 and "gold_accuracy" in meta["final_eval"]
  params, _ = stage_io.load_init_model(path, cfg, "test")
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init_params(cfg,
                                                                            jax.random.key(0)))
  with open(tmp_path / "run" / "dpo" / "metrics.jsonl") as f:
    train = [json.loads(l) for l in f if '"train"' in l]
  assert [r["step"] for r in train] == [2, 4] and all("accuracy" in r for r in train)
  assert dpo.run(config, str(tmp_path / "run")) == path     # finished: skipped


def test_a_ppo_checkpoint_resumes_whatever_the_dpo_section_says():
  """The PPO stage's config record carries `dpo`/`dpo_run` (the pipeline's config) without reading
  them: a checkpoint written before they existed, or with another beta, resumes."""
  config = config_files.get_config(os.path.join(ROOT, "configs", "ppo_ptx.py"), "tiny")
  record = loop.config_record(config)
  before = {k: v for k, v in record.items() if k != "dpo_run" and not k.startswith("dpo.")}
  assert len(before) < len(record)
  loop.check_resume_config(before, config, "the checkpoint")
  config.dpo.beta = 0.5
  loop.check_resume_config(record, config, "the checkpoint")
  config.ppo.kl_coef = 0.3                    # a PPO field still has to match
  with pytest.raises(UserError, match=r"^config\.ppo\.kl_coef is 0\.3 but the checkpoint"):
    loop.check_resume_config(record, config, "the checkpoint")
