"""Benchmark worker: seconds per PPO iteration of Google tunix's PPOLearner.

Runs in tunix's own venv (see shared PEERS.md, section "tunix"), e.g.

  /work/peers/tunix/bin/python benchmarks/peers/tunix_ppo.py \
      --layers=4 --d_model=256 --heads=4 --vocab=8192 --num_prompts=16 \
      --prompt_len=32 --response_len=32 --warmup=2 --iters=4 --seed=0

What one iteration is (tunix 0.1.7, `tunix.rl.ppo.ppo_learner.PPOLearner`):
rollout with its `VanillaRollout` (tunix's jitted sampler) of `response_len`
tokens for `num_prompts` prompts, reference and old-policy log-probs, critic
values and reward-model scores (scalar-head models), KL-penalised token
rewards, GAE, then one epoch with one minibatch of `num_prompts` for the actor
(clipped PPO loss) and for the critic (clipped value loss). All roles share one
single-device mesh, so the rollout model shares the actor's weights and there is
no weight sync. Float32, temperature 1, no pretraining (ptx) term: tunix's PPO
has none.

Models are random-initialised tunix Qwen2 (tunix has no GPT-2; its Llama3
cannot be critic/reward in 0.1.7 because `compute_score` passes
`segment_ids`, which Llama3 does not accept). Policy and reference: tied
embeddings; critic and reward: the same backbone with the LM head replaced by
a d_model x 1 linear (`tunix.rl.utils.create_critic_model`). MLP kernels are
re-drawn at random and the embedding scaled to N(0, 0.02) as in
tunix_generate.py (tunix zero-initialises MLP kernels).

Every response is exactly `response_len` tokens: pad and EOS ids lie outside
the vocabulary, so they can never be sampled.

Timing: the training loop pulls one batch of prompts per iteration from a
generator; the time between consecutive pulls (and from the last pull to the
end of the run) is one iteration. The first `warmup` iterations (compilation)
are dropped; the report is the median of the remaining `iters`. Breakdown:
the cluster's generate / ref log-probs / old log-probs / values / rewards /
actor update / critic update / weight sync calls are wrapped by timers that
block on their results; "other" is the rest (GAE, metrics, host glue).

Stdout carries exactly one line, the last: `RESULT {json}` with s_per_iter,
times_s (the timed iterations) and breakdown_s (median seconds per phase).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import worker_io  # benchmarks/peers/worker_io.py (this script's folder; standard library only)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def _random_qwen2(qwen2_lib, config, seed):
  """Qwen2 with tunix's init except random MLP kernels and a N(0, 0.02) embedding."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  model = qwen2_lib.Qwen2(config, rngs=nnx.Rngs(params=seed))
  key = jax.random.PRNGKey(seed + 12345)
  for layer in model.layers:
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      lin = getattr(layer.mlp, name)
      key, sub = jax.random.split(key)
      shape = lin.kernel.get_value().shape
      lin.kernel.set_value(
          jax.random.normal(sub, shape, jnp.float32) / np.sqrt(shape[0]))
  emb = model.embedder.input_embedding
  emb.set_value(emb.get_value() * 0.02)
  return model


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--d_ff', type=int, default=None, help='defaults to 4 x d_model')
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--num_prompts', type=int, default=16)
  p.add_argument('--prompt_len', type=int, default=32)
  p.add_argument('--response_len', type=int, default=32)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--iters', type=int, default=4)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  d_ff = args.d_ff or 4 * args.d_model

  # Only the RESULT line goes to the real stdout; everything else to stderr.
  real_stdout = worker_io.claim_stdout()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2_lib
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl import utils as rl_utils
  from tunix.rl.ppo import ppo_learner
  from tunix.rl.rollout import base_rollout
  from tunix_generate import WordTokenizer

  version = worker_io.package_version('google-tunix')
  _log(f'tunix {version}, jax {jax.__version__}, devices {jax.devices()}')

  def config(tied):
    return qwen2_lib.ModelConfig(
        num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.d_model,
        hidden_dim=d_ff, num_heads=args.heads,
        head_dim=args.d_model // args.heads, num_kv_heads=args.heads,
        rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=tied,
        dtype=jnp.float32, param_dtype=jnp.float32)

  mesh = jax.make_mesh((1, 1), ('fsdp', 'tp'), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with mesh:
    actor = _random_qwen2(qwen2_lib, config(True), args.seed)
    reference = _random_qwen2(qwen2_lib, config(True), args.seed)
    # create_critic_model swaps `lm_head`, which only an untied Qwen2 has.
    critic = rl_utils.create_critic_model(
        _random_qwen2(qwen2_lib, config(False), args.seed + 1), seed=args.seed)
    reward = rl_utils.create_critic_model(
        _random_qwen2(qwen2_lib, config(False), args.seed + 2),
        seed=args.seed + 1)

  tokenizer = WordTokenizer(args.vocab)
  n_total = args.warmup + args.iters
  training_config = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(1e-5),
      critic_optimizer=optax.adamw(1e-5),
      eval_every_n_steps=10 ** 9,
      max_steps=n_total + 10,      # the run ends when the prompt generator does
      mini_batch_size=args.num_prompts,
      train_micro_batch_size=args.num_prompts,
      metrics_logging_options=None,
      pbar_description=None,
  )
  rollout_config = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.response_len,
      max_prompt_length=args.prompt_len,
      kv_cache_size=args.prompt_len + args.response_len,
      temperature=1.0, top_p=1.0, top_k=None,
      eos_tokens=[tokenizer.eos_id()],
  )
  roles = [rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.CRITIC,
           rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.REWARD,
           rl_cluster_lib.Role.ROLLOUT]
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, critic=critic, reference=reference, reward=reward,
      tokenizer=tokenizer,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={r: mesh for r in roles},
          rollout_engine='vanilla', offload_to_cpu=False,
          training_config=training_config, rollout_config=rollout_config))
  learner = ppo_learner.PPOLearner(
      rl_cluster=cluster,
      ppo_config=ppo_learner.PPOConfig(
          num_iterations=1, beta=0.02, kl_method='kl', gamma=1.0,
          gae_lambda=0.95, epsilon=0.2, clip_range_value=0.2,
          entropy_coef=None))

  # Breakdown: wrap the cluster's phases with blocking timers.
  phases = {}      # name -> list of seconds, one entry per iteration
  current = {}

  def timed(name, fn, block_on=None):
    def wrapper(*a, **kw):
      t = time.perf_counter()
      out = fn(*a, **kw)
      jax.block_until_ready(block_on() if block_on else out)
      current[name] = current.get(name, 0.0) + time.perf_counter() - t
      return out
    return wrapper

  for name in ('get_ref_per_token_logps', 'get_old_per_token_logps',
               'get_values', 'get_rewards'):
    setattr(cluster, name, timed(name, getattr(cluster, name)))
  timed_generate = timed('generate', cluster.generate, lambda: None)

  def generate(*a, **kw):
    out = timed_generate(*a, **kw)
    lens = {len(t) for t in out.tokens}
    if lens != {args.response_len} or len(out.tokens) != args.num_prompts:
      raise RuntimeError(f'{len(out.tokens)} responses of lengths {sorted(lens)}, expected '
                         f'{args.num_prompts} x {args.response_len}')
    return out

  cluster.generate = generate
  cluster.update_actor = timed(
      'update_actor', cluster.update_actor,
      lambda: nnx.state(cluster.actor_trainer.model))
  cluster.update_critic = timed(
      'update_critic', cluster.update_critic,
      lambda: nnx.state(cluster.critic_trainer.model))
  cluster.sync_weights = timed(
      'sync_weights', cluster.sync_weights,
      lambda: nnx.state(cluster.rollout.model()))

  rng = np.random.default_rng(args.seed)
  prompt_ids = rng.integers(0, args.vocab, size=(args.num_prompts, args.prompt_len))
  prompts = [tokenizer.decode(row) for row in prompt_ids]
  stamps = []

  def batches():
    for _ in range(n_total):
      if stamps:
        phases_done = dict(current)
        current.clear()
        for k, v in phases_done.items():
          phases.setdefault(k, []).append(v)
      stamps.append(time.perf_counter())
      yield {'prompts': np.array(prompts)}
    stamps.append(time.perf_counter())
    for k, v in current.items():
      phases.setdefault(k, []).append(v)

  _log(f'{n_total} iterations ({args.warmup} warm-up) ...')
  learner.train(batches())
  if len(stamps) != n_total + 1:
    raise RuntimeError(f'ran {len(stamps) - 1} iterations, expected {n_total}')
  steps = cluster.actor_trainer.train_steps
  if steps != n_total:
    raise RuntimeError(f'actor took {steps} optimizer steps, expected {n_total}')
  times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
  for i, t in enumerate(times):
    _log(f'iteration {i}: {t:.3f} s ' + ' '.join(
        f'{k}={v[i]:.3f}' for k, v in phases.items() if i < len(v)))
  timed_iters = times[args.warmup:]
  breakdown = {k: statistics.median(v[args.warmup:]) for k, v in phases.items()
               if len(v) == n_total}
  s_per_iter = statistics.median(timed_iters)
  breakdown['other'] = max(0.0, s_per_iter - sum(breakdown.values()))
  result = {
      's_per_iter': s_per_iter,
      'times_s': timed_iters,
      'breakdown_s': breakdown,
      'model': 'qwen2',
      'tunix_version': version,
  }
  worker_io.emit_result(real_stdout, result)
  return 0


if __name__ == '__main__':
  sys.exit(main())
