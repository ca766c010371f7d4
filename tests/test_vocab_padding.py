"""Vocabulary padding (`model.vocab_multiple`) and chunked logits (`model.logits_chunk`).

A model whose vocabulary (500) is padded to 512 rows must compute the same function as the
unpadded model on the same real weights: the same log-probs, losses and greedy/sampled tokens,
never a padded id; HF export strips the rows, loading pads them. The chunked head must give the
losses and gradients of the whole logits, in less memory.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import convert, logprobs, sharding
from rlhf_jax.models import ModelConfig, abstract_params, init_params
from rlhf_jax.models import hf as hf_format
from rlhf_jax.models.transformer import lm_head_logits, resize_vocab
from rlhf_jax.sampling import SamplingConfig, choose_token, sample
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import forward

CFG = ModelConfig(vocab_size=500, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=64, max_len=64)
PADDED = CFG.replace(vocab_multiple=128)
B, T = 4, 12


def _padded_params(cfg, params, seed=1):
  """`params` with the padded rows filled with large random values (zeros would hide a missing
  mask less well: a padded logit of 0 is still a likely token)."""
  out = resize_vocab(params, cfg, cfg.padded_vocab)
  rng = np.random.default_rng(seed)
  embed = np.asarray(out["embed"]).copy()
  embed[cfg.vocab_size:] = 5.0 * rng.standard_normal(embed[cfg.vocab_size:].shape)
  out = dict(out, embed=jnp.asarray(embed))
  if "lm_head" in out:
    kernel = np.asarray(out["lm_head"]["kernel"]).copy()
    kernel[:, cfg.vocab_size:] = 5.0 * rng.standard_normal(kernel[:, cfg.vocab_size:].shape)
    out["lm_head"] = {"kernel": jnp.asarray(kernel)}
  return out


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[1, :3] = 0
  seg[2, 7:] = 2
  tokens[seg == 0] = 0
  mask = (rng.random((B, T)) < 0.8).astype(np.float32) * (seg > 0)
  return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask}


def test_padded_config_rows_and_validation():
  assert (CFG.padded_vocab, PADDED.padded_vocab) == (500, 512)
  assert CFG.replace(vocab_multiple=1).padded_vocab == 500
  assert ModelConfig(vocab_size=50257, vocab_multiple=128).padded_vocab == 50304
  assert abstract_params(PADDED)["embed"].shape == (512, 32)
  from rlhf_jax.errors import UserError
  with pytest.raises(UserError, match="vocab_multiple must be a non-negative integer"):
    CFG.replace(vocab_multiple=-1)
  with pytest.raises(UserError, match="logits_chunk must be a non-negative integer"):
    CFG.replace(logits_chunk=1.5)


@pytest.mark.parametrize("tie", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_padded_model_computes_the_unpadded_function(tie):
  """Same real weights, padded rows random: the real logits agree to float rounding (measured
  0 on CPU), padded logits are the mask value, and log-probs, entropy and the LM loss (whole and
  chunked, at T = 0.7) agree to 1e-6."""
  cfg, pcfg = CFG.replace(tie_embeddings=tie), PADDED.replace(tie_embeddings=tie)
  params = init_params(cfg, jax.random.key(0))
  pparams = _padded_params(pcfg, params)
  batch = _batch()

  @functools.partial(jax.jit, static_argnums=0)
  def outputs(c, p):
    lp, ent = logprobs.next_token_logprobs(c, p, batch, 0.7, head_from=4)
    return (forward(c, "lm", p, batch), lm_head_logits(c, p, forward(c, "none", p, batch)), lp,
            ent, logprobs.lm_loss(c, p, batch))
  logits, _, ref_lp, ref_ent, ref_loss = outputs(cfg, params)
  plogits, head, _, _, _ = outputs(pcfg, pparams)
  assert plogits.shape[-1] == 512
  np.testing.assert_allclose(plogits[..., :500], logits, atol=1e-6, rtol=0)
  assert float(jnp.max(plogits[..., 500:])) <= -1e29
  np.testing.assert_allclose(head, plogits, atol=1e-6, rtol=0)
  for chunk in (0, 5):
    _, _, lp, ent, loss = outputs(pcfg.replace(logits_chunk=chunk), pparams)
    np.testing.assert_allclose(lp, ref_lp, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-6, rtol=0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert np.all(np.isfinite(np.asarray(lp))) and np.all(np.isfinite(np.asarray(ent)))


@pytest.mark.slow
def test_padded_model_samples_the_same_tokens_and_never_a_padded_id():
  """Greedy, plain and top-k/top-p sampling from the padded model give the unpadded model's
  tokens and log-probs; a hot sampler (T = 5) over many rows never draws an id >= vocab_size,
  nor does `choose_token` on logits whose real part is flat (padding at the CDF's end)."""
  params = init_params(CFG, jax.random.key(0))
  pparams = _padded_params(PADDED, params)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 500, (8, 5)).astype(np.int32)
  seg = np.ones_like(prompts)
  for sc in (SamplingConfig(max_new_tokens=6, greedy=True),
             SamplingConfig(max_new_tokens=6, temperature=0.8),
             SamplingConfig(max_new_tokens=6, top_k=20, top_p=0.9)):
    ref = sample(params, CFG, prompts, seg, jax.random.key(2), sc, num_samples=2)
    got = sample(pparams, PADDED, prompts, seg, jax.random.key(2), sc, num_samples=2)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-6, rtol=0)
  hot = sample(pparams, PADDED, np.repeat(prompts, 8, 0), np.repeat(seg, 8, 0),
               jax.random.key(3), SamplingConfig(max_new_tokens=16, temperature=5.0))
  assert int(np.max(hot.tokens)) < 500 and len(np.unique(hot.tokens)) > 100
  flat = jnp.zeros((256, 512)).at[:, 500:].set(-1e30)
  for seed in range(4):
    token, logprob = choose_token(flat, jax.random.key(seed), SamplingConfig(temperature=3.0))
    assert int(jnp.max(token)) < 500
    np.testing.assert_allclose(logprob, -np.log(500), rtol=1e-5)


def test_hf_export_strips_and_loading_pads(tmp_path):
  """Exported to Hugging Face format the padded model has the real vocabulary (500 rows, like the
  unpadded export); loaded as init_from into a padded config (on a 1 x 4 x 2 mesh) the rows are
  padded with zeros and the embedding is sharded over 'tensor' (500 rows could not be)."""
  params = init_params(CFG, jax.random.key(0))
  pparams = _padded_params(PADDED, params)
  ref = hf_format.params_to_hf(CFG, jax.tree.map(np.asarray, params))
  got = hf_format.params_to_hf(PADDED, jax.tree.map(np.asarray, pparams))
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  path = str(tmp_path / "hf")
  convert.save_model(path, PADDED, jax.tree.map(np.asarray, pparams), "hf")
  loaded = convert.load_model(path)
  assert loaded.cfg.vocab_size == 500 and loaded.params["embed"].shape == (500, 32)
  mesh = sharding.make_mesh((1, 4, 2))
  got, _ = stage_io.load_init_model(path, PADDED, "config.init_from", mesh)
  assert got["embed"].shape == (512, 32)
  assert got["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  np.testing.assert_array_equal(np.asarray(got["embed"])[:500], np.asarray(params["embed"]))
  assert not np.any(np.asarray(got["embed"])[500:])
  host, _ = stage_io.load_init_model(path, PADDED, "config.init_from")
  assert host["embed"].shape == (512, 32)


@pytest.mark.parametrize("tie", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_chunked_logits_give_the_same_loss_and_gradient(tie):
  """logits_chunk 5 on 11 predicting positions (two full chunks and a padded one) against the
  whole logits: the LM loss and its gradient (every parameter), and PPO-style log-probs from
  head_from at T = 0.7 with their gradient. Measured: the loss equal, gradients within 1.7e-7
  of the largest gradient entry; checked to 1e-6 of it."""
  cfg = CFG.replace(tie_embeddings=tie)
  chunked = cfg.replace(logits_chunk=5)
  params = init_params(cfg, jax.random.key(1))
  batch = _batch(3)

  def losses_of(c):
    def lm(p):
      return logprobs.lm_loss(c, p, batch)[0]

    def ppo_like(p):
      lp, ent = logprobs.next_token_logprobs(c, p, batch, 0.7, head_from=3)
      return jnp.sum(lp * batch["loss_mask"][:, 4:]) + 0.1 * jnp.sum(ent)
    return jax.jit(lambda p: [jax.value_and_grad(f)(p) for f in (lm, ppo_like)])(params)
  for (ref, ref_grad), (got, grad) in zip(losses_of(cfg), losses_of(chunked)):
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grad))
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
      np.testing.assert_allclose(g, r, atol=1e-6 * scale, rtol=0)


def _temp_bytes(cfg, batch_rows, seq):
  params = abstract_params(cfg)
  batch = {"tokens": jax.ShapeDtypeStruct((batch_rows, seq), jnp.int32),
           "segment_ids": jax.ShapeDtypeStruct((batch_rows, seq), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((batch_rows, seq), jnp.float32)}
  step = jax.jit(jax.grad(lambda p, b: logprobs.lm_loss(cfg, p, b)[0]))
  return step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_chunked_logits_need_less_memory():
  """The compiled gradient of the LM loss with the GPT-2 vocabulary padded to 50304, 4 rows of
  512 tokens (a 1 x 64 model, so the logits dominate): XLA's temp bytes whole vs 64-position
  chunks. Measured on CPU: 1.30 GB -> 0.22 GB (0.37 GB in 128-position chunks; the whole
  float32 logits are 0.41 GB)."""
  cfg = ModelConfig(vocab_size=50257, vocab_multiple=128, num_layers=1, d_model=64, num_heads=4,
                    num_kv_heads=4, head_dim=16, d_ff=128, max_len=512)
  whole = _temp_bytes(cfg, 4, 512)
  chunked = _temp_bytes(cfg.replace(logits_chunk=64), 4, 512)
  logits_bytes = 4 * 511 * 50304 * 4
  assert whole > 2 * logits_bytes
  assert chunked < whole / 3
