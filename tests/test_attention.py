"""Attention implementations (`model.attention_impl`) against the reference einsum, on CPU.

'xla' runs as on any backend; 'splash' runs the Pallas TPU kernel through the Pallas interpreter
(the same kernel code, interpreted), alone and in its `shard_map` under a mesh; 'cudnn' cannot run
without a GPU: its lowering for CUDA is checked (jax emits the cuDNN fused-attention calls for our
shapes), and with libtpu installed the splash kernel is compiled by the TPU compiler for a v5e
slice. Tolerances are max |difference| of the logits on real (non-padding) tokens, whose
magnitude is ~1.6 here, and of the gradients (largest entry ~0.4 for tiny, ~2.5 for tiny-gpt2);
measured values in the comments.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unittest import mock

from rlhf_jax import sharding
from rlhf_jax.models import Transformer, blocked_attention, get_model_config, init_cache, init_params
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import attention_impl, target_platform

T = 128   # the splash kernel's smallest block


def _packed(cfg, b=2, t=T):
  """Rows with left padding, three packed documents and trailing padding."""
  rng = np.random.RandomState(2)
  tokens = rng.randint(3, cfg.vocab_size, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[0, :5] = 0
  seg[1 % b, 10:70] = 2
  seg[1 % b, 70:] = 3
  seg[1 % b, -3:] = 0
  tokens[seg == 0] = 0
  return tokens, seg


def _logits(cfg, params, tokens, seg):
  out = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens, segment_ids=seg)[0])(params)
  return np.asarray(out, np.float32)


def _grads(cfg, params, tokens, seg):
  def loss(p):
    out, _ = Transformer(cfg).apply({"params": p}, tokens, segment_ids=seg)
    logp = jax.nn.log_softmax(out.astype(jnp.float32))
    return (logp[..., 5] * (seg != 0)).sum() / (seg != 0).sum()
  return jax.jit(jax.grad(loss))(params)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# (impl, dtype) -> (logits tolerance, gradient tolerance). Measured: xla 0 / <=2.4e-7 in both
# dtypes; splash float32 4.8e-7 / 2.4e-7, bfloat16 4.2e-3 / 1.6e-2 (bfloat16 spacing at 2.5 is
# 1.6e-2: one rounding step of the largest gradient entry).
TOLERANCE = {("xla", "float32"): (1e-6, 1e-6), ("xla", "bfloat16"): (1e-2, 2e-2),
             ("blocked", "float32"): (2e-6, 2e-6), ("blocked", "bfloat16"): (1e-2, 4e-2),
             ("splash", "float32"): (2e-6, 1e-6), ("splash", "bfloat16"): (1e-2, 4e-2)}


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_attention_equals_einsum_with_packing(name, dtype, impl):
  """Through the whole model, forward and backward; 'blocked' at T = 128 with 32-row blocks
  (4 blocks, the last query block sees all keys, the first a quarter)."""
  cfg = get_model_config(name, dtype=dtype, attention_impl="einsum")
  params = init_params(cfg, jax.random.key(0))
  tokens, seg = _packed(cfg)
  fused = cfg.replace(attention_impl=impl)
  real = seg != 0
  with mock.patch.object(blocked_attention, "default_block", lambda t: 32):
    ref, got = _logits(cfg, params, tokens, seg), _logits(fused, params, tokens, seg)
    grads = _grads(fused, params, tokens, seg)
  tol_logits, tol_grad = TOLERANCE[(impl, dtype)]
  assert np.abs(got - ref)[real].max() <= tol_logits
  assert _max_diff(grads, _grads(cfg, params, tokens, seg)) <= tol_grad


def _attention64(q, k, v, mask):
  """Brute-force float64 causal attention: q (B, T, K, G, D), k, v (B, T, K, D), mask (B, T, T)."""
  s = np.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask[:, None, None], s, -1e30)   # finite, as the model: padding rows stay finite
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkgts,bskd->btkgd", p, v)


@pytest.mark.parametrize("t,block", [(100, 32), (64, 64), (96, 16)])
def test_blocked_attention_against_float64(t, block):
  """Values and all three gradients against float64 numpy (finite differences of the brute-force
  reference for the gradients), with grouped queries (2 kv heads x 2), packing and padding rows
  (their cotangent is 0, as a loss mask makes it), and a short last block (t = 100, block 32)."""
  rng = np.random.RandomState(0)
  b, kv, g, d = 2, 2, 2, 8
  q, k, v = (rng.randn(b, t, kv, *s, d) for s in ((g,), (), ()))
  seg = np.ones((b, t), np.int32)
  seg[0, :7] = 0
  seg[1, t // 2:] = 2
  pos = np.arange(t)
  mask = (pos[None, :] <= pos[:, None])[None] & (seg[:, :, None] == seg[:, None, :]) & \
      (seg != 0)[:, None, :]
  real = (seg != 0)[:, :, None, None, None]
  ct = rng.randn(b, t, kv, g, d) * real
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: blocked_attention.blocked_attention(q, k, v, mask, block),
                     f32(q), f32(k), f32(v))
  ref = _attention64(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out) * real, ref * real, atol=2e-6, rtol=0)
  grads = vjp(f32(ct))
  eps = 1e-6
  for i, x in enumerate((q, k, v)):    # d<ct, f>/dx by central differences on 40 random entries
    flat = x.reshape(-1)
    for j in rng.choice(flat.size, 40, replace=False):
      hi, lo = [a.copy() for a in (q, k, v)], [a.copy() for a in (q, k, v)]
      hi[i].reshape(-1)[j] += eps
      lo[i].reshape(-1)[j] -= eps
      num = ((_attention64(*hi, mask) - _attention64(*lo, mask)) * ct).sum() / (2 * eps)
      assert abs(float(np.asarray(grads[i]).reshape(-1)[j]) - num) <= 2e-5 + 1e-5 * abs(num)


def test_blocked_attention_blocks():
  assert blocked_attention.block_bounds(100, 32) == [(0, 32), (32, 64), (64, 96), (96, 100)]
  assert [blocked_attention.default_block(t) for t in (64, 255, 256, 512, 2048, 4096)] == [
      64, 255, 128, 128, 128, 256]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_kernel_equals_einsum_with_packing(dtype):
  """The Pallas splash kernel (interpreted on CPU), forward and backward, llama flavour with
  grouped-query attention (4 heads on 2 key/value heads)."""
  cfg = get_model_config("tiny", dtype=dtype, attention_impl="einsum")
  params = init_params(cfg, jax.random.key(0))
  tokens, seg = _packed(cfg)
  fused = cfg.replace(attention_impl="splash")
  assert attention_impl(fused, T, cached=False, dropout=False) == "splash"
  real = seg != 0
  ref, got = _logits(cfg, params, tokens, seg), _logits(fused, params, tokens, seg)
  tol_logits, tol_grad = TOLERANCE[("splash", dtype)]
  assert np.abs(got - ref)[real].max() <= tol_logits
  assert _max_diff(_grads(fused, params, tokens, seg), _grads(cfg, params, tokens, seg)) <= tol_grad


def test_splash_kernel_per_shard_under_a_mesh():
  """Under `sharding.activate` the kernel runs in a shard_map: batch over data x fsdp, heads over
  tensor (4 heads and 2 key/value heads on tensor=2); same logits as unsharded einsum."""
  cfg = get_model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  tokens, seg = _packed(cfg, b=4)
  fused = cfg.replace(attention_impl="splash")
  mesh = sharding.make_mesh((2, 2, 2))
  with sharding.activate(mesh):
    fn = jax.jit(lambda p, t, s: Transformer(fused).apply({"params": p}, t, segment_ids=s)[0])
    assert "manual_computation" in fn.lower(params, tokens, seg).as_text()
    got = np.asarray(fn(params, tokens, seg))
  ref = _logits(cfg.replace(attention_impl="einsum"), params, tokens, seg)
  assert np.abs(got - ref)[seg != 0].max() <= 2e-6      # measured 3.6e-7


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("impl", ["xla", "cudnn", "splash", "blocked"])
def test_kv_cache_decode_with_each_impl(name, impl):
  """Prefill of left-padded prompts then token-by-token decoding with the cache == the einsum
  path's full forward (the cache path of cudnn and splash is XLA's: same check)."""
  cfg = get_model_config(name).replace(attention_impl=impl)
  params = init_params(cfg, jax.random.key(0))
  b, p, n = 3, 9, 5
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (b, p + n)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[1, :3] = 0
  seg[2, :7] = 0
  full = _logits(cfg.replace(attention_impl="einsum"), params, tokens, seg)
  model = Transformer(cfg)
  step = jax.jit(lambda c, t, s: model.apply({"params": params}, t, segment_ids=s, cache=c))
  logits, cache = step(init_cache(cfg, b, p + n + 2), tokens[:, :p], seg[:, :p])
  got = [logits]
  for i in range(p, p + n):
    logits, cache = step(cache, tokens[:, i:i + 1], seg[:, i:i + 1])
    got.append(logits)
  got = np.concatenate([np.asarray(g) for g in got], axis=1)
  np.testing.assert_allclose(got[seg == 1], full[seg == 1], atol=1e-5, rtol=0)  # as test_model's


def test_attention_impl_resolution():
  cfg = get_model_config("tiny")
  pick = lambda impl, platform, length=256, cached=False, dropout=False, **kw: attention_impl(
      cfg.replace(attention_impl=impl, **kw), length, cached, dropout, platform)
  assert pick("einsum", "tpu") == "einsum"
  assert pick("auto", "cpu") == "blocked"
  assert pick("auto", "cpu", cached=True) == "einsum"   # decoding: the reference path
  assert pick("blocked", "cpu", dropout=True) == "einsum"
  assert pick("auto", "tpu") == "splash"
  assert pick("auto", "tpu", length=200) == "xla"  # not a multiple of the kernel's block
  assert pick("auto", "tpu", cached=True) == "xla"
  assert pick("splash", "tpu", dropout=True) == "einsum"
  assert pick("cudnn", "gpu") == "xla"             # float32: cuDNN flash attention wants 16 bits
  assert pick("cudnn", "gpu", dtype="bfloat16") == "cudnn"
  assert pick("cudnn", "gpu", dtype="bfloat16", length=7) == "xla"
  assert pick("cudnn", "gpu", dtype="bfloat16", cached=True) == "xla"
  assert pick("xla", "cpu", cached=True) == "xla"
  with target_platform("tpu"):
    assert attention_impl(cfg.replace(attention_impl="auto"), 256, False, False) == "splash"
  with pytest.raises(Exception, match="attention_impl must be one of"):
    ModelConfig(attention_impl="flash")


def test_cudnn_lowers_for_cuda(monkeypatch):
  """No GPU here: lower the bfloat16 forward and backward for CUDA with jax's cuDNN version check
  stubbed, and find cuDNN's fused attention calls (causal mask in the kernel) for our shapes."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  from rlhf_jax.models import abstract_params
  cfg = get_model_config("tiny", attention_impl="cudnn", dtype="bfloat16")
  tok = jax.ShapeDtypeStruct((2, 64), jnp.int32)

  def loss(p, t, s):
    out, _ = Transformer(cfg).apply({"params": p}, t, segment_ids=s)
    return out.astype(jnp.float32).mean()
  with target_platform("gpu"):
    lowered = jax.jit(jax.grad(loss)).trace(abstract_params(cfg), tok, tok).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "__cudnn$fmhaScaleBiasSoftmax" in text and "fmhaScaleBiasSoftmaxBackward" in text
  assert "CAUSAL" in text


def test_splash_compiles_for_a_tpu_slice():
  """With libtpu installed (`pip install "jax[tpu]"`), the TPU compiler itself compiles the
  bfloat16 forward and backward with the splash kernel for v5e:2x2 (no TPU needed)."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 2, 2), sharding.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  from rlhf_jax.models import abstract_params
  cfg = get_model_config("tiny", attention_impl="auto", dtype="bfloat16")
  shardings = sharding.param_shardings(abstract_params(cfg, boxed=True), mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_params(cfg), shardings)
  rows = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))

  def loss(p, t, s):
    out, _ = Transformer(cfg).apply({"params": p}, t, segment_ids=s)
    return out.astype(jnp.float32).mean()
  with target_platform("tpu"), sharding.activate(mesh):
    lowered = jax.jit(jax.grad(loss)).lower(params, rows, rows)
    assert "tpu_custom_call" in lowered.as_text()
    assert lowered.compile().memory_analysis() is not None
