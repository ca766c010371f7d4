"""Decoding at scale: the rollout's weights cast (`ppo.rollout_dtype`) and resharded once into the
decode layout (`ppo.rollout_layout`; `sampling.decode_weights`, `sharding.DECODE_AXIS_RULES`), on
the 8 fake CPU devices."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_micro_batches as mb
from rlhf_jax import logprobs, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, abstract_params, init_params
from rlhf_jax.sampling import SamplingConfig, decode_weights, sample
from rlhf_jax.train import ppo_iteration

# Dimensions that tell the weights apart in HLO types.
CFG = ModelConfig(vocab_size=96, num_layers=2, d_model=48, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=80, max_len=64)
SC = SamplingConfig(max_new_tokens=6, temperature=0.9, eos_token_id=7)


def _inputs(mesh, b=8):
  params = init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, CFG.vocab_size, (b, 5)).astype(np.int32)
  seg = np.ones_like(prompts)
  seg[2, :2] = 0
  psh = sharding.param_shardings(abstract_params(CFG, "lm", boxed=True), mesh)
  bsh = sharding.batch_sharding(mesh, 2)
  return (jax.device_put(params, psh), jax.device_put(prompts, bsh), jax.device_put(seg, bsh))


def _sampler(mesh, layout, dtype=""):
  def f(params, prompts, seg, key):
    if layout == "decode":
      cfg, params = decode_weights(params, CFG, dtype, mesh)
    else:
      cfg = CFG
    return sample(params, cfg, prompts, seg, key, SC, num_samples=2)
  return jax.jit(f)


def _loop_carried(hlo: str):
  """(dtype, element count) of every float array the decode loop carries (the while op with the
  most operands); counts, not shapes, because XLA may carry a kernel reshaped (48, 1, 8) ->
  (48, 8)."""
  loops = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
  carried = max(loops, key=len)
  return [(d, math.prod(int(x) for x in s.split(",") if x))
          for d, s in re.findall(r"\b(f32|bf16)\[([\d,]*)\]", carried)]


def _decode_shard_sizes(mesh, rules=sharding.DECODE_AXIS_RULES):
  """Element counts of each per-layer weight's shard in the decode layout on `mesh` (or the
  layout of other `rules`)."""
  boxed = abstract_params(CFG.replace(scan_layers=False), "lm", boxed=True)
  shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
  return [math.prod(s.shard_shape(x.shape))
          for x, s in zip(jax.tree.leaves(nn.unbox(boxed)), jax.tree.leaves(shardings))]


def _contains(carried, wanted):
  """Whether the multiset `carried` holds every element of `wanted`."""
  pool = list(carried)
  for item in wanted:
    if item not in pool:
      return False
    pool.remove(item)
  return True


@pytest.mark.parametrize("mesh_shape", [pytest.param((1, 8, 1), marks=pytest.mark.slow),
                                        (1, 4, 2)])
def test_decode_layout_samples_the_same_and_carries_decode_weights(mesh_shape):
  """float32 weights in the decode layout give today's tokens exactly and log-probs to 1e-6;
  the compiled decode loop carries every weight as its decode-layout shard (replicated over
  fsdp, heads/mlp/vocab split over tensor) and no FSDP shard of any weight. (XLA:CPU hoists most
  of the training layout's all-gathers out of the loop by itself, float32 and unasked; on
  1 x 4 x 2 the embedding still stays FSDP-sharded inside the loop there, checked too.)"""
  mesh = sharding.make_mesh(mesh_shape)
  params, prompts, seg = _inputs(mesh)
  key = jax.random.key(1)
  with sharding.activate(mesh):
    train_fn, decode_fn = _sampler(mesh, "train"), _sampler(mesh, "decode")
    ref, got = train_fn(params, prompts, seg, key), decode_fn(params, prompts, seg, key)
    decode_hlo = decode_fn.lower(params, prompts, seg, key).compile().as_text()
    train_hlo = train_fn.lower(params, prompts, seg, key).compile().as_text()
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.lengths, ref.lengths)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-6, rtol=0)
  wanted = _decode_shard_sizes(mesh)
  fsdp_shards = set(_decode_shard_sizes(mesh, sharding.LOGICAL_AXIS_RULES)) - set(wanted)
  assert fsdp_shards     # the two layouts differ on this mesh
  carried = [n for _, n in _loop_carried(decode_hlo)]
  assert _contains(carried, wanted)
  assert not fsdp_shards & set(carried)
  if mesh_shape == (1, 4, 2):
    assert fsdp_shards & {n for _, n in _loop_carried(train_hlo)}


@pytest.mark.slow
def test_bfloat16_rollout_weights():
  """bfloat16 decode weights on 1 x 4 x 2: the loop carries the decode-layout shards and a
  bfloat16 KV cache (XLA:CPU has no bfloat16 matmul: it converts the bfloat16 weights to float32
  once, before the loop, so on CPU the carried weights are float32 copies of the bfloat16
  values; on TPU/GPU they stay bfloat16), and the sampled
  tokens' log-probs agree with a float32 forward on the same tokens to 0.05 (measured max
  0.002 here; bfloat16 has 8 bits of mantissa); greedy decoding picks the float32 tokens at
  >= 90% of positions (measured 100%)."""
  mesh = sharding.make_mesh((1, 4, 2))
  params, prompts, seg = _inputs(mesh)
  key = jax.random.key(1)
  with sharding.activate(mesh):
    fn = _sampler(mesh, "decode", "bfloat16")
    got = fn(params, prompts, seg, key)
    hlo = fn.lower(params, prompts, seg, key).compile().as_text()
  carried = _loop_carried(hlo)
  assert _contains([n for _, n in carried], _decode_shard_sizes(mesh))
  cache = 4 * 1 * 11 * 8    # rows/fsdp x kv_heads/tensor x slots x head_dim, one per layer, k and v
  assert carried.count(("bf16", cache)) == 4 and ("f32", cache) not in carried
  tokens = np.concatenate([np.repeat(np.asarray(prompts), 2, 0), np.asarray(got.tokens)], 1)
  segs = np.concatenate([np.repeat(np.asarray(seg), 2, 0), np.asarray(got.mask > 0, np.int32)], 1)
  ref, _ = logprobs.next_token_logprobs(CFG, jax.tree.map(np.asarray, params),
                                        {"tokens": tokens, "segment_ids": segs}, SC.temperature,
                                        head_from=4)
  mask = np.asarray(got.mask)
  assert np.max(np.abs(np.asarray(got.logprobs) - np.asarray(ref) * mask)) < 0.05
  greedy = SamplingConfig(max_new_tokens=6, greedy=True)
  host = jax.tree.map(np.asarray, params)
  f32 = sample(host, CFG, np.asarray(prompts), np.asarray(seg), key, greedy)
  bcfg, bparams = decode_weights(host, CFG, "bfloat16")
  bf16 = sample(bparams, bcfg, np.asarray(prompts), np.asarray(seg), key, greedy)
  assert np.mean(np.asarray(f32.tokens) == np.asarray(bf16.tokens)) >= 0.9


@pytest.mark.slow
def test_ppo_iteration_with_decode_layout_gives_the_same_update():
  """A whole PPO-ptx iteration (2 x 2 x 2 mesh, rollout in 2 chunks) with rollout_layout
  'decode' (float32): the same responses bit for bit and the same update to 1e-6 as the
  training layout ('auto' on CPU, where devices report no memory, is the training layout)."""
  txs = {"policy": optax.sgd(0.5), "value": optax.sgd(0.02)}
  mesh = sharding.make_mesh((2, 2, 2))
  kw = dict(rollout_micro_batches=2)
  ref_state, ref_metrics, (_, ref_tokens, _) = mb._iterate(mb._settings(**kw), txs, mesh)
  state, metrics, (_, tokens, _) = mb._iterate(mb._settings(rollout_layout="decode", **kw), txs,
                                                mesh)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
  assert mb._max_diff(state["params"], ref_state["params"]) < 1e-6
  assert float(metrics["reward"]) == pytest.approx(float(ref_metrics["reward"]), abs=1e-6)
  s = mb._settings(rollout_layout="auto")
  assert ppo_iteration.decode_mesh(mb.CFG, s, mesh) is None
  assert ppo_iteration.decode_mesh(mb.CFG, mb._settings(rollout_layout="decode"), mesh) is mesh


def test_rollout_fields_are_checked():
  with pytest.raises(UserError, match=r"^config\.ppo\.rollout_dtype must be one of"):
    ppo_iteration.check_rollout_fields("float16", "train")
  with pytest.raises(UserError, match=r"^config\.ppo\.rollout_layout must be one of .* got 'tp'"):
    ppo_iteration.check_rollout_fields("bfloat16", "tp")


@pytest.mark.slow
def test_kv_cache_follows_the_rule_table():
  """The KV cache buffers are sharded by the logical rules (batch over data x fsdp, kv_heads
  over tensor), in the prefill's output and inside the decode loop."""
  from rlhf_jax.models import Transformer, init_cache
  mesh = sharding.make_mesh((2, 2, 2))
  params, prompts, seg = _inputs(mesh)
  dcfg = CFG.replace(scan_layers=False)

  def prefill(params, prompts, seg):
    params = decode_weights(params, CFG, "", mesh)[1]
    cache = init_cache(dcfg, prompts.shape[0], 16)
    return Transformer(dcfg).apply({"params": params}, prompts, segment_ids=seg, cache=cache,
                                   last_only=True)[1]
  with sharding.activate(mesh):
    cache = jax.jit(prefill)(params, prompts, seg)
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
  for buf in cache["k"] + cache["v"]:
    assert buf.sharding.spec == spec, buf.sharding
