"""PPO-ptx: estimators and losses against float64 numpy references, and the jitted iteration's
invariants (ratio 1 on the first minibatch, the ptx gradient summed into the same update, each
term clipped by its own norm, the EMA per optimizer step, sharded == 1 device, no buffer shared
between the frozen models and the donated state, the gold reward)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppo_settings import tiny_settings
from rlhf_jax import losses, rollout, sharding
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.train import ppo, ppo_gold, ppo_iteration
from rlhf_jax.train.step import split_micro_batches


def _mask(rng, b, n):
  lengths = rng.integers(1, n + 1, b)
  lengths[0] = n  # one row without early EOS
  return (np.arange(n)[None] < lengths[:, None]).astype(np.float32)


def gae_reference(rewards, values, mask, gamma, lam):
  b, n = rewards.shape
  adv = np.zeros((b, n))
  for i in range(b):
    last = 0.0
    for t in reversed(range(n)):
      if not mask[i, t]:
        last = 0.0
        continue
      next_v = values[i, t + 1] if t + 1 < n and mask[i, t + 1] else 0.0
      if not (t + 1 < n and mask[i, t + 1]):
        last = 0.0
      delta = rewards[i, t] + gamma * next_v - values[i, t]
      last = delta + gamma * lam * last
      adv[i, t] = last
  return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
  rng = np.random.default_rng(0)
  b, n = 5, 9
  mask = _mask(rng, b, n)
  rewards = rng.normal(size=(b, n))
  values = rng.normal(size=(b, n))
  # Garbage on padding must not leak into real positions.
  rewards_in = np.where(mask > 0, rewards, 1e3)
  values_in = np.where(mask > 0, values, -1e3)
  adv, ret = losses.gae(jnp.asarray(rewards_in, jnp.float32), jnp.asarray(values_in, jnp.float32),
                        jnp.asarray(mask), gamma, lam)
  ref_adv, ref_ret = gae_reference(rewards * mask, values * mask, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_policy_and_value_losses_match_numpy():
  rng = np.random.default_rng(1)
  b, n, eps = 4, 7, 0.2
  mask = _mask(rng, b, n)
  logp = rng.normal(-2, 0.5, (b, n))
  old = logp + rng.normal(0, 0.4, (b, n))
  adv = rng.normal(size=(b, n))
  s, c, stats = losses.ppo_policy_loss(*(jnp.asarray(x, jnp.float32)
                                         for x in (logp, old, adv, mask)), eps)
  ratio = np.exp(logp - old)
  per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
  np.testing.assert_allclose(float(s), (per * mask).sum(), rtol=1e-5)
  assert float(c) == mask.sum()
  np.testing.assert_allclose(float(stats["approx_kl_sum"]),
                             (((ratio - 1) - np.log(ratio)) * mask).sum(), rtol=1e-4)
  clipped = (-adv * np.clip(ratio, 1 - eps, 1 + eps)) > (-adv * ratio)
  assert float(stats["clipped_sum"]) == (clipped * mask).sum()
  np.testing.assert_allclose(float(stats["ratio_max"]), ratio[mask > 0].max(), rtol=1e-5)

  values, old_v, returns = (rng.normal(size=(b, n)) for _ in range(3))
  vs, vc = losses.ppo_value_loss(*(jnp.asarray(x, jnp.float32)
                                   for x in (values, old_v, returns, mask)), eps)
  v_clip = old_v + np.clip(values - old_v, -eps, eps)
  ref = 0.5 * np.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
  np.testing.assert_allclose(float(vs), (ref * mask).sum(), rtol=1e-5)
  assert float(vc) == mask.sum()


def test_log_ratio_is_clamped():
  s, _, stats = losses.ppo_policy_loss(jnp.array([[0.0]]), jnp.array([[-500.0]]),
                                       jnp.array([[1.0]]), jnp.array([[1.0]]), 0.2)
  assert np.isfinite(float(s)) and np.isfinite(float(stats["approx_kl_sum"]))
  g = jax.grad(lambda lp: losses.ppo_policy_loss(lp, jnp.array([[-500.0]]), jnp.array([[-1.0]]),
                                                 jnp.array([[1.0]]), 0.2)[0])(jnp.array([[0.0]]))
  assert np.all(np.isfinite(np.asarray(g)))


def test_whiten_ignores_padding():
  rng = np.random.default_rng(2)
  mask = _mask(rng, 4, 6)
  x = rng.normal(3, 2, (4, 6))
  out = np.asarray(losses.whiten(jnp.asarray(np.where(mask > 0, x, 1e4), jnp.float32),
                                 jnp.asarray(mask)))
  real = x[mask > 0]
  np.testing.assert_allclose(out[mask > 0], (real - real.mean()) / real.std(), rtol=1e-4,
                             atol=1e-5)
  assert np.all(out[mask == 0] == 0)
  kept = np.asarray(losses.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask),
                                  shift_mean=False))
  np.testing.assert_allclose(kept[mask > 0], (real - real.mean()) / real.std() + real.mean(),
                             rtol=1e-4)


def test_kl_rewards_and_controller():
  rng = np.random.default_rng(3)
  mask = _mask(rng, 3, 5)
  logp, ref = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  scores = rng.normal(size=3)
  r, kl = losses.kl_penalty_rewards(*(jnp.asarray(x, jnp.float32) for x in (logp, ref, scores,
                                                                            mask)), 0.1)
  expect = -0.1 * (logp - ref) * mask
  last = mask.sum(1).astype(int) - 1
  expect[np.arange(3), last] += scores
  np.testing.assert_allclose(np.asarray(r), expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(kl), ((logp - ref) * mask).sum(1), rtol=1e-5)
  assert float(losses.adaptive_kl_coef(0.1, 12.0, 6.0, 1000.0, 100)) == pytest.approx(0.1 * 1.02)
  assert float(losses.adaptive_kl_coef(0.1, 6.6, 6.0, 1000.0, 100)) == pytest.approx(0.1 * 1.01)


# ----------------------------------------------------------------------------- the iteration

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=64, max_len=64)
B, P, N = 8, 6, 5


def _setup(settings, tx=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  policy = init_params(CFG, keys[0], "lm")
  value = init_params(CFG, keys[1], "scalar")
  rm = init_params(CFG, keys[2], "scalar")
  tx = tx or optax.adam(3e-3)
  txs = {"policy": tx, "value": tx}
  state = {"params": {"policy": policy, "value": value},
           "opt_state": {"policy": tx.init(policy), "value": tx.init(value)},
           "step": jnp.zeros((), jnp.int32), "kl_coef": jnp.float32(0.1)}
  frozen = {"ref": jax.tree.map(jnp.copy, policy), "rm": rm}
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, CFG.vocab_size, (B, P)).astype(np.int32)
  seg = np.ones((B, P), np.int32)
  seg[1, :2] = 0  # left padding
  seg[5, :4] = 0
  prompts[seg == 0] = 0
  batch = {"prompts": prompts, "prompt_segment_ids": seg}
  ptx_tokens = rng.integers(3, CFG.vocab_size, (B, 12)).astype(np.int32)
  ptx = {"ptx_tokens": ptx_tokens, "ptx_segment_ids": np.ones((B, 12), np.int32),
         "ptx_positions": np.tile(np.arange(12, dtype=np.int32), (B, 1)),
         "ptx_loss_mask": np.ones((B, 12), np.float32)}
  return state, frozen, batch, ptx, txs


def _settings(**kw):
  base = dict(batch_size=B, prompt_len=P, response_len=N, minibatches=2, epochs=2,
              eos_token_id=2, pad_token_id=0)
  base.update(kw)
  return tiny_settings(**base)


def _run(settings, state, frozen, batch, txs, mesh=None):
  it = jax.jit(ppo_iteration.make_iteration(CFG, CFG, CFG, settings, txs, mesh))
  return it(state, frozen, batch, jax.random.key(7))


def test_ratio_is_one_on_first_minibatch_only():
  """The rollout's old log-probs are the sampler's own, at the sampling temperature: the PPO
  forward reproduces what `sample` returned, the first minibatch of the first epoch (nothing has
  moved yet) sees ratio 1 and the later ones do not, and the KL metric against another reference
  is the sampler's log-probs minus an independent forward of that reference."""
  import dataclasses
  from rlhf_jax.models import Transformer
  from rlhf_jax.sampling import SamplingConfig, sample
  temperature = 0.7                  # != 1, so a log-prob taken at another temperature shows
  state, frozen, batch, _, txs = _setup(None)
  frozen["ref"] = init_params(CFG, jax.random.key(99), "lm")
  policy = jax.tree.map(np.asarray, state["params"]["policy"])
  sample_rng = jax.random.split(jax.random.key(7))[0]     # what the iteration samples with
  sc = SamplingConfig(max_new_tokens=N, temperature=temperature, pad_token_id=0)
  free = sample(policy, CFG, batch["prompts"], batch["prompt_segment_ids"], sample_rng, sc)
  # EOS: a token the policy samples often, so some rows end early (masked log-probs) and some not.
  eos = int(np.bincount(np.asarray(free.tokens).ravel()).argmax())
  s = _settings(temperature=temperature, eos_token_id=eos)
  _, metrics, (per_mb, tokens, lengths) = _run(s, state, frozen, batch, txs)
  # The same rollout from the sampler itself.
  out = sample(policy, CFG, batch["prompts"], batch["prompt_segment_ids"], sample_rng,
               dataclasses.replace(sc, eos_token_id=eos))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(tokens),
                                err_msg="the iteration no longer samples with split(rng)[0]")
  np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(lengths))
  mask, sampler_logp = np.asarray(out.mask), np.asarray(out.logprobs)
  assert (out.lengths < N).any() and (out.lengths == N).any() and np.all(sampler_logp[mask > 0] < 0)
  full = np.concatenate([batch["prompts"], np.asarray(out.tokens)], 1)
  seg = np.concatenate([batch["prompt_segment_ids"], (mask > 0).astype(np.int32)], 1)
  logp, _ = rollout.policy_logprobs(CFG, policy, full, seg, P, temperature)
  np.testing.assert_allclose(np.asarray(logp) * mask, sampler_logp, atol=2e-5)
  # ... and so is the entropy metric (the sampler's per-step entropies, no policy forward)
  _, entropy = rollout.policy_logprobs(CFG, policy, full, seg, P, temperature)
  assert float(metrics["entropy"]) == pytest.approx(
      float((np.asarray(entropy) * mask).sum() / mask.sum()), rel=1e-5)

  dev, akl = np.asarray(per_mb["ratio_dev"]), np.asarray(per_mb["approx_kl"])
  assert dev.shape == (4,)
  assert dev[0] == 0.0 and akl[0] == 0.0       # its own forward, held constant: exactly 1
  assert np.all(dev[1:] > 1e-3) and np.all(akl[1:] > 1e-7)

  # KL = E[sum_t log pi(y_t) - log pi_ref(y_t)], pi from the sampler, pi_ref by a plain forward.
  logits, _ = Transformer(CFG).apply({"params": frozen["ref"]}, full, segment_ids=seg)
  ref_logp = np.take_along_axis(
      np.asarray(jax.nn.log_softmax(logits[:, P - 1:-1] / temperature, -1), np.float64),
      np.asarray(out.tokens)[..., None], -1)[..., 0]
  kl = np.mean(np.sum((sampler_logp - ref_logp) * mask, 1))
  assert abs(kl) > 0.01
  assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-4, abs=1e-5)


def test_first_update_takes_its_value_forward_from_scoring():
  """The first minibatch's value forward is the scoring pass's (`_Iteration.score` keeps it with
  jax.vjp; no parameter moves in between): that update equals one that runs its own value
  forward (both networks' new parameters and optimizer states, the losses), with ptx, 2
  minibatches; the value function moves. Measured: equal within 1e-7."""
  s = _settings(ptx_coef=0.5, ptx_rows=B)
  state, frozen, batch, ptx, txs = _setup(s)
  it = ppo_iteration._Iteration(CFG, CFG, CFG, s, txs, None, None)

  @jax.jit
  def both(state, frozen, batch):
    params = state["params"]
    out, tokens, seg, has_eos = it.rollout(params["policy"], batch, jax.random.key(3))
    (logp, _, ref_logp, values, scores), first_values = it.score(params, frozen, tokens, seg,
                                                                 out)
    _, _, advantages, returns = it.advantages(logp, ref_logp, values, scores, has_eos, out.mask,
                                              state["kl_coef"])
    data = {"tokens": tokens, "segment_ids": seg, "mask": out.mask, "old_logp": logp,
            "old_values": values, "advantages": advantages, "returns": returns}
    mb0 = jax.tree.map(lambda x: x[0], split_micro_batches(data, s.minibatches))
    ptx0 = jax.tree.map(lambda x: x[0], split_micro_batches(
        {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")}, s.minibatches))
    carry = (params, state["opt_state"], None)
    xs = (mb0, ptx0)
    return (it.update(carry, xs, first=True, first_values=first_values),
            it.update(carry, xs, first=True))
  (reused, aux), (own, own_aux) = both(state, frozen, {**batch, **ptx})
  for a, b_ in zip(jax.tree.leaves(reused), jax.tree.leaves(own)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-7)
  for k in ("loss", "value_loss", "policy_loss", "grad_norm", "ptx_loss"):
    assert float(aux[k]) == pytest.approx(float(own_aux[k]), rel=1e-5), k
  assert float(aux["value_loss"]) > 0
  moved = [np.abs(np.asarray(a) - np.asarray(b_)).max() for a, b_ in
           zip(jax.tree.leaves(reused[0]["value"]), jax.tree.leaves(state["params"]["value"]))]
  assert max(moved) > 1e-4


@pytest.mark.slow
def test_ptx_coef_zero_is_bit_identical_to_no_pretraining_batch():
  s0 = _settings(ptx_coef=0.0, ptx_rows=B)
  state, frozen, batch, ptx, txs = _setup(s0)
  with_rows, _, _ = _run(s0, state, frozen, {**batch, **ptx}, txs)
  state, frozen, batch, ptx, txs = _setup(s0)
  without, _, _ = _run(_settings(), state, frozen, batch, txs)
  for a, b in zip(jax.tree.leaves(with_rows["params"]), jax.tree.leaves(without["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ptx_gradient_is_summed_into_the_same_update():
  """With SGD, one epoch and one minibatch: delta(ptx) - delta(no ptx) = -lr * coef * grad(ptx)."""
  lr, coef = 0.1, 0.5
  tx = optax.sgd(lr)
  one = dict(minibatches=1, epochs=1)
  state, frozen, batch, ptx, txs = _setup(None, tx)
  policy0 = jax.tree.map(np.asarray, state["params"]["policy"])
  plain, _, _ = _run(_settings(**one), state, frozen, batch, txs)
  state, frozen, batch, ptx, txs = _setup(None, tx)
  mixed, m, _ = _run(_settings(ptx_coef=coef, ptx_rows=B, **one), state, frozen,
                     {**batch, **ptx}, txs)

  def ptx_loss(p):
    from rlhf_jax.train.step import forward
    rows = {k[4:]: jnp.asarray(v) for k, v in ptx.items()}
    s_, c_ = losses.lm_loss(forward(CFG, "lm", p, rows), rows["tokens"], rows["loss_mask"])
    return s_ / c_
  g = jax.grad(ptx_loss)(policy0)
  assert float(m["ptx_loss"]) == pytest.approx(float(ptx_loss(policy0)), rel=1e-5)
  for a, b_, gg in zip(jax.tree.leaves(mixed["params"]["policy"]),
                       jax.tree.leaves(plain["params"]["policy"]), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(a) - np.asarray(b_), -lr * coef * np.asarray(gg),
                               atol=2e-6)
  for a, b_ in zip(jax.tree.leaves(mixed["params"]["value"]),
                   jax.tree.leaves(plain["params"]["value"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-6)


@pytest.mark.slow
def test_sharded_iteration_equals_one_device():
  s = _settings(ptx_coef=0.5, ptx_rows=B)
  state, frozen, batch, ptx, txs = _setup(s)
  full = {**batch, **ptx}
  ref_state, ref_metrics, _ = _run(s, state, frozen, full, txs)
  mesh = sharding.make_mesh((2, 2, 2))
  state, frozen, batch, ptx, txs = _setup(s)
  from rlhf_jax.models import abstract_params
  psh = sharding.param_shardings(abstract_params(CFG, "lm", boxed=True), mesh)
  vsh = sharding.param_shardings(abstract_params(CFG, "scalar", boxed=True), mesh)
  state["params"] = {"policy": jax.device_put(state["params"]["policy"], psh),
                     "value": jax.device_put(state["params"]["value"], vsh)}
  frozen = {"ref": jax.device_put(frozen["ref"], psh), "rm": jax.device_put(frozen["rm"], vsh)}
  sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                   for k, v in full.items()}
  with sharding.activate(mesh):
    got_state, got_metrics, _ = _run(s, state, frozen, sharded_batch, txs, mesh)
  assert got_state["params"]["policy"]["layers"]["mlp"]["up"]["kernel"].sharding.spec != sharding.replicated(mesh).spec
  for a, b_ in zip(jax.tree.leaves(got_state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5)
  for k in ("reward", "kl", "policy_loss", "value_loss", "ptx_loss"):
    assert float(got_metrics[k]) == pytest.approx(float(ref_metrics[k]), abs=1e-5)


def _with_txs(state, txs):
  state["opt_state"] = {k: txs[k].init(state["params"][k]) for k in ("policy", "value")}
  return state


def _sgd_txs(lr, clip=0.0):
  tx = optax.sgd(lr) if not clip else optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr))
  return {"policy": tx, "value": optax.sgd(lr)}


def _delta(after, before):
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), after,
                      before)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


@pytest.mark.slow
def test_each_term_is_clipped_by_its_own_norm():
  """Plain PPO: the iteration's clip == the old clip inside the policy optimizer. With ptx (coef
  large), the policy step is -lr (clip(g_ppo) + clip(g_ptx)), the ptx part computed by hand: the
  PPO part is not scaled down by the ptx gradient's size."""
  lr, clip, coef = 0.1, 1e-3, 20.0
  one = dict(minibatches=1, epochs=1)
  state, frozen, batch, ptx, _ = _setup(None)
  policy0 = jax.tree.map(np.asarray, state["params"]["policy"])
  txs = _sgd_txs(lr, clip)
  old, old_m, _ = _run(_settings(**one), _with_txs(state, txs), frozen, batch, txs)
  state, frozen, batch, ptx, _ = _setup(None)
  txs = _sgd_txs(lr)
  plain, plain_m, _ = _run(_settings(grad_clip=clip, **one), _with_txs(state, txs), frozen, batch,
                           txs)
  for a, b_ in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(old["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-7)
  assert float(plain_m["grad_norm_ppo"]) > 10 * clip       # the clip is active
  assert "grad_norm_ptx" not in plain_m and "ptx_loss" not in plain_m
  ppo_step = _delta(plain["params"]["policy"], policy0)
  assert _norm(ppo_step) == pytest.approx(lr * clip, rel=1e-4)

  state, frozen, batch, ptx, _ = _setup(None)
  mixed, m, _ = _run(_settings(grad_clip=clip, ptx_coef=coef, ptx_rows=B, **one),
                     _with_txs(state, txs), frozen, {**batch, **ptx}, txs)

  def ptx_term(p):
    from rlhf_jax.train.step import forward
    rows = {k[4:]: jnp.asarray(v) for k, v in ptx.items()}
    s_, c_ = losses.lm_loss(forward(CFG, "lm", p, rows), rows["tokens"], rows["loss_mask"])
    return coef * s_ / c_
  g_ptx = jax.tree.map(lambda g: np.asarray(g, np.float64), jax.grad(ptx_term)(policy0))
  norm_ptx = _norm(g_ptx)
  assert float(m["grad_norm_ptx"]) == pytest.approx(norm_ptx, rel=1e-4)
  assert norm_ptx > 10 * clip
  assert float(m["grad_norm_ppo"]) == pytest.approx(float(plain_m["grad_norm_ppo"]), rel=1e-5)
  expect = jax.tree.map(lambda a, g: a - lr * clip / norm_ptx * g, ppo_step, g_ptx)
  got = _delta(mixed["params"]["policy"], policy0)
  for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(expect)):
    np.testing.assert_allclose(a, b_, atol=1e-7)
  # One clip of the sum would have made the step at most lr * clip long.
  assert _norm(got) > 1.3 * lr * clip


def _recording_sgd(lr, log):
  """SGD that appends every new parameter value to `log` (host side, in order)."""
  base = optax.sgd(lr)

  def update(grads, state, params):
    upd, state = base.update(grads, state, params)
    jax.debug.callback(lambda p, u: log.append(jax.tree.map(lambda a, b: np.asarray(a + b), p, u)),
                       params, upd, ordered=True)
    return upd, state
  return optax.GradientTransformation(base.init, update)


def test_ema_moves_after_every_optimizer_step():
  """ema_decay d, 2 epochs x 2 minibatches: the EMA is the per-step recursion
  e <- d e + (1 - d) p_k over the 4 updates, and a skipped (non-finite) update does not move it."""
  d = 0.5
  s = _settings(ema_decay=d)
  state, frozen, batch, _, _ = _setup(s)
  log = []
  txs = {"policy": _recording_sgd(0.3, log), "value": optax.sgd(0.3)}
  state = _with_txs(state, txs)
  state["ema"] = jax.tree.map(jnp.copy, state["params"]["policy"])
  policy0 = jax.tree.map(np.asarray, state["params"]["policy"])
  it = jax.jit(ppo_iteration.make_iteration(CFG, CFG, CFG, s, txs))
  new, metrics, _ = it(state, frozen, batch, jax.random.key(7))
  jax.effects_barrier()
  assert len(log) == 4 and float(metrics["nonfinite"]) == 0
  ema = policy0
  for p in log:
    ema = jax.tree.map(lambda e_, p_: d * e_ + (1 - d) * p_, ema, p)
  once = jax.tree.map(lambda e_, p_: d * e_ + (1 - d) * p_, policy0, log[-1])
  for a, b_, c_ in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(ema), jax.tree.leaves(once)):
    np.testing.assert_allclose(np.asarray(a), b_, rtol=1e-5, atol=1e-6)
  assert max(float(np.max(np.abs(np.asarray(a) - c_)))
             for a, c_ in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(once))) > 1e-3
  for a, b_ in zip(jax.tree.leaves(new["params"]["policy"]), jax.tree.leaves(log[-1])):
    np.testing.assert_allclose(np.asarray(a), b_, atol=1e-7)   # (XLA may fuse p + u)

  # A NaN reference makes every minibatch non-finite: nothing moves, the EMA included.
  state, frozen, batch, _, _ = _setup(s)
  state = _with_txs(state, txs)
  state["ema"] = jax.tree.map(lambda x: x + 1.0, state["params"]["policy"])
  ema0 = jax.tree.map(np.asarray, state["ema"])
  frozen["ref"] = jax.tree.map(lambda x: x * jnp.nan, frozen["ref"])
  new, metrics, _ = it(state, frozen, batch, jax.random.key(7))
  assert float(metrics["nonfinite"]) == 4
  for a, b_ in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(ema0)):
    np.testing.assert_array_equal(np.asarray(a), b_)


def test_frozen_models_share_no_buffer_with_the_donated_state():
  """`ppo.place` from jax.Arrays already on the device, the value function being the very arrays
  of the reward model (value_from == reward_model): two donated iterations run."""
  s = _settings(ema_decay=0.9)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  keys = jax.random.split(jax.random.key(0), 2)
  policy, rm = init_params(CFG, keys[0], "lm"), init_params(CFG, keys[1], "scalar")
  assert isinstance(jax.tree.leaves(policy)[0], jax.Array)
  txs = {"policy": optax.adam(1e-3), "value": optax.adam(1e-3)}
  shardings = ppo.state_shardings(CFG, CFG, txs, mesh, ema=True)
  frozen_sh = {"ref": shardings["params"]["policy"], "rm": shardings["params"]["value"]}
  state, frozen = ppo.place(policy, rm, rm, txs, shardings, frozen_sh, 0.1)
  _, _, batch, _, _ = _setup(s)
  step = ppo.jit_iteration(ppo_iteration.make_iteration(CFG, CFG, CFG, s, txs, mesh), shardings,
                           frozen_sh, batch, mesh)
  for i in range(2):
    with sharding.activate(mesh):
      state, metrics, _ = step(state, frozen, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["reward"]))
  assert int(state["step"]) == 2


# ----------------------------------------------------------------------------- bad input

SIZES = {"ptx": 50, "sft": 50, "comparisons": 20, "prompts": 64, "validation": 16}


@pytest.fixture(scope="module")
def ppo_inputs(tmp_path_factory):
  """Offline data, a random 'SFT' model, a matching reward model and a mismatched one."""
  from rlhf_jax.convert import save_model
  from rlhf_jax.data import prepare
  from rlhf_jax.data.offline_dataset import OfflineSizes
  root = tmp_path_factory.mktemp("ppo_inputs")
  data = root / "data"
  sizes = OfflineSizes(**SIZES)
  paths = prepare.prepare_offline(str(data), sizes=sizes)
  cfg = ModelConfig(vocab_size=512, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                    head_dim=16, d_ff=64, max_len=128)
  keys = jax.random.split(jax.random.key(0), 3)
  save_model(str(root / "sft"), cfg, jax.device_get(init_params(cfg, keys[0], "lm")),
             fmt="rlhf_jax", head="lm", tokenizer_dir=paths["tokenizer"])
  save_model(str(root / "rm"), cfg, jax.device_get(init_params(cfg, keys[1], "scalar")),
             fmt="rlhf_jax", head="scalar", tokenizer_dir=paths["tokenizer"])
  other = cfg.replace(vocab_size=600)
  save_model(str(root / "rm_other"), other, jax.device_get(init_params(other, keys[2], "scalar")),
             fmt="rlhf_jax", head="scalar", tokenizer_dir=paths["tokenizer"])
  return root, cfg


def _main(args, workdir, timeout=300):
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = ""
  return subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--config=configs/ppo_ptx.py",
                         f"--workdir={workdir}", *args], capture_output=True, text=True,
                        timeout=timeout, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ppo_args(root, cfg, **over):
  args = {"pipeline": False, "init_from": root / "sft", "reward_model": root / "rm",
          "value_from": root / "rm", "data.dir": root / "data", "model.num_layers": 1,
          "model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 2,
          "model.head_dim": 16, "model.d_ff": 64, "model.max_len": 128,
          "ppo.num_iterations": 2, "ppo.batch_size": 8, "ppo.minibatches": 2,
          "ppo.prompt_len": 32, "ppo.response_len": 8, "ppo.ptx_seq_len": 32,
          **{f"data.task.{k}": v for k, v in SIZES.items()}}   # (as the fixture prepared it)
  args.update(over)
  return [f"--config.{k}={v}" for k, v in args.items()]


@pytest.mark.parametrize("over,needle", [
    ({"ppo.kl_coef": -0.1}, "config.ppo.kl_coef"),
    ({"ppo.minibatches": 3}, "config.ppo.minibatches"),
    ({"value_from": "RM_OTHER"}, "config.value_from"),
    ({"reward_model": "RM_OTHER", "value_from": "RM_OTHER"}, "config.reward_model"),
    ({"reward_model": "SFT"}, "config.reward_model"),
    ({"reward_model": "gold", "data.source": "dir"}, "config.reward_model"),
])
def test_bad_ppo_input_is_one_line_exit_2(ppo_inputs, tmp_path, over, needle):
  root, cfg = ppo_inputs
  names = {"RM_OTHER": root / "rm_other", "SFT": root / "sft"}
  over = {k: names.get(v, v) if isinstance(v, str) else v for k, v in over.items()}
  workdir = tmp_path / "w"
  proc = _main(_ppo_args(root, cfg, **over), workdir)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, lines
  assert not (workdir / "ppo_ptx").exists()


# ----------------------------------------------------------------------------- gold reward

def _episodes(tok, prompts, responses, prompt_len, n):
  """(tokens (B, P + N), lengths, response texts as decoded): EOS after a response that fits."""
  from rlhf_jax.data import encoding
  rows, lengths, texts = [], [], []
  for prompt, response in zip(prompts, responses):
    ids = list(tok.encode(response))[:n]
    texts.append(tok.decode(ids))
    ids += [tok.eos_id] if len(ids) < n else []
    lengths.append(len(ids))
    head = encoding.prompt_row(tok.encode(prompt), tok.bos_id, tok.pad_id, prompt_len)["tokens"]
    rows.append(np.concatenate([head, ids + [tok.pad_id] * (n - len(ids))]))
  return np.asarray(rows, np.int32), np.asarray(lengths, np.int32), texts


def test_gold_score_fn_is_the_gold_labeler_on_decoded_texts(ppo_inputs):
  from rlhf_jax.data import gold_labeler, load_tokenizer, loaders, offline_task
  from rlhf_jax.errors import UserError
  from rlhf_jax.train import stage_io
  root, _ = ppo_inputs
  tok = load_tokenizer(str(root / "data" / "tokenizer"))
  source = stage_io.load_split(str(root / "data" / "tfds"), "prompts", "train", "train_split")
  prompts = [loaders.text_of(source[i]["prompt"]) for i in range(4)]
  answers = [offline_task.answer_text(*offline_task.parse_prompt(q)) for q in prompts]
  responses = [answers[0], answers[1] + " fig" * 12, "", " 7 pear"]
  p_len, n, scale = 32, 10, 2.0
  tokens, lengths, texts = _episodes(tok, prompts, responses, p_len, n)
  assert lengths[1] == n and tokens[1, -1] != tok.eos_id     # a response cut without EOS
  expect = [scale * gold_labeler.gold_score(q, a) for q, a in zip(prompts, texts)]
  assert expect[0] == scale and expect[2] == 0.0
  fn = ppo_gold.gold_score_fn(tok, scale)
  got = jax.jit(lambda t, l: fn(t, l, p_len))(tokens, lengths)
  np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-6)
  # As the iteration calls it: inside lax.map over minibatches.
  split = jax.jit(lambda t, l: jax.lax.map(lambda x: fn(x[0], x[1], p_len),
                                           (t.reshape(2, 2, -1), l.reshape(2, 2))))
  np.testing.assert_allclose(np.asarray(split(tokens, lengths)).reshape(-1), expect, rtol=1e-6)
  shifted = ppo_gold.gold_score_fn(tok, scale, shift=0.25)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda t, l: shifted(t, l, p_len))(
      tokens, lengths)), [e - scale * 0.25 for e in expect], rtol=1e-6)
  assert [q for q, _ in rollout.episode_texts(tok, tokens, lengths, p_len)] == prompts
  ppo_gold.check_gold_prompts(source, tok, p_len)
  with pytest.raises(UserError, match="config.ppo.prompt_len"):
    ppo_gold.check_gold_prompts(source, tok, 6)


def test_gold_reward_run_writes_ppo_oracle(ppo_inputs, tmp_path):
  """config.reward_model='gold' end to end: no reward model loaded, stage ppo_oracle, and the
  iteration's reward (the gold labeler in the jitted step) equals the host-side gold score."""
  import json
  root, cfg = ppo_inputs
  workdir = tmp_path / "w"
  proc = _main(_ppo_args(root, cfg, reward_model="gold", **{"ppo.ptx_coef": 0.0,
                                                            "ppo.log_every": 1,
                                                            "ppo.gold_reward_scale": 1.0}),
               workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "ppo_oracle" / "model").is_dir() and not (workdir / "ppo").exists()
  rows = [json.loads(line) for line in open(workdir / "ppo_oracle" / "metrics.jsonl")]
  assert len(rows) == 2
  for row in rows:
    assert row["reward"] == pytest.approx(row["gold_score"], abs=1e-6)
    assert "grad_norm_ppo" in row and "grad_norm_ptx" not in row



def test_gold_reward_is_normalised_by_the_collect_stage(tmp_path):
  """gold_reward_scale 0: (gold - mean) / std of the gold score of the SFT samples collect
  ranked (the RM's normalisation); a scale > 0 is used as given; no collect.json: one line."""
  import json
  import ml_collections
  from rlhf_jax.errors import UserError
  config = ml_collections.ConfigDict({"ppo": {"gold_reward_scale": 0.0},
                                      "data": {"train_split": "train"}})
  with pytest.raises(UserError, match="config.ppo.gold_reward_scale: 0 normalises"):
    ppo_gold.gold_reward_norm(config, str(tmp_path))
  (tmp_path / "collect").mkdir()
  stats = {"splits": {"train": {"mean_gold_score": 0.4, "gold_score_std": 0.25}}}
  (tmp_path / "collect" / "collect.json").write_text(json.dumps(stats))
  assert ppo_gold.gold_reward_norm(config, str(tmp_path)) == (0.4, 4.0)
  config.ppo.gold_reward_scale = 2.0
  assert ppo_gold.gold_reward_norm(config, str(tmp_path)) == (0.0, 2.0)
