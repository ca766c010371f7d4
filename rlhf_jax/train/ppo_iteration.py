"""One PPO-ptx iteration as ONE pure jitted function: rollout, scoring, advantages, updates, KL.

Objective (Ouyang et al. 2022, eq. 2), maximised over the policy pi_RL:

  E_{x ~ prompts, y ~ pi_RL(.|x)} [ r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
    + gamma * E_{x ~ D_pretrain} [ log pi_RL(x) ]

One iteration, `iteration(state, frozen, batch, rng) -> (state, metrics, per_minibatch)`, is ONE
jitted pure function:
  1. rollout: B prompts -> B responses of at most N tokens with the jitted sampler (temperature T;
     log-probs are taken at the same temperature everywhere), in `rollout_micro_batches` chunks
     one after the other (`lax.map`); each row draws the random numbers it would draw in one
     call on the whole batch, so the samples do not depend on the chunking. The policy's weights
     are first cast to `rollout_dtype` and resharded into the decode layout (`rollout_layout`,
     `sampling.decode_weights`), once per rollout, when the config asks;
  2. score: old log-probs and entropy (the sampler's, from the rollout's own forward passes; a
     policy forward when `rollout_dtype` is not float32), reference log-probs, old values (value function,
     the state before each response token), the reward at the last token (reward model), minus
     `missing_eos_penalty` for a response that never emitted EOS; in max(minibatches,
     rollout_micro_batches) chunks. When the chunks are the minibatches, the first chunk's value
     forward is kept (`jax.vjp`) for the first update, which runs at the same parameters on the
     same rows: that update runs no value forward of its own;
  3. per-token reward r_t = -beta * (logp_t - logp_ref_t) (+ the score at the last token)
     (`losses.kl_penalty_rewards`), optionally whitened; GAE with gamma 1 and lambda
     (`losses.gae`); advantages whitened over the real tokens of the batch;
  4. `epochs` x `minibatches` updates inside `lax.scan`: the clipped policy loss plus vf_coef x
     the clipped value loss (the PPO term), and ptx_coef x the LM loss on this minibatch's share of
     the pretraining rows (the ptx term). Both terms are applied in the same AdamW step (the
     paper's gamma term is not a separate optimizer step), but the policy gradient of each term is
     clipped to `grad_clip` by its OWN global norm before they are summed:

       g_policy = clip(grad_policy(PPO term)) + clip(grad_policy(ptx term)),
       clip(g) = g * min(1, grad_clip / |g|)

     One clip of the sum would let a large early ptx gradient (SFT wipes out a small model's
     language modelling) shrink the PPO part along with it; per-term clips bound each term and
     keep the PPO step the same size whatever the ptx term does. So the policy's AdamW does not
     clip again (`ppo._optimizer(..., clip=False)`); the value function's AdamW clips its own
     gradient as usual. Without ptx this is exactly the old single clip of the policy gradient.
     The cost is unchanged: the ptx forward/backward is on other rows anyway. With
     `ptx_micro_batches` > 1 a minibatch's pretraining rows go through the forward/backward in
     that many chunks (`lax.scan`), the gradient of the chunks' loss sums and their token counts
     accumulated and divided once: the same gradient as one pass over the rows (as SFT's
     `grad_accum_steps`), in a fraction of the activation memory. Logged: `grad_norm`
     (the whole unclipped gradient, policy and value), `grad_norm_ppo` and `grad_norm_ptx` (the
     policy gradient of each term before clipping), per-minibatch means over the iteration.
     The first minibatch of the first epoch (no update yet) takes its old log-probs from its own
     forward (held constant), so its ratio is exactly 1; later ones use step 2's;
  5. the KL coefficient: fixed, or the Ziegler et al. controller on the rollout's KL. The optional
     EMA of the policy weights (paper 0.992), which is what the stage saves, is updated after
     every applied optimizer step (ema <- d ema + (1 - d) policy), not once per iteration.

The reward of a finished episode is pluggable (`make_iteration(score_fn=...)`): by default the
reward model at the last token (`rollout.last_token_scores`); `ppo_gold.gold_score_fn` is the
offline task's gold labeler (the oracle run).

The policy and value function are separate networks with their own AdamW (own learning rates),
one state pytree: {'params': {'policy', 'value'}, 'opt_state': {'policy', 'value'}, 'step',
'kl_coef'[, 'ema']}. A minibatch whose loss or gradient is not finite is not applied (counted in
`nonfinite`; nor is the EMA moved). Dropout is off in every forward pass.

Reading order: `Settings` (the static hyperparameters), `_Iteration` (the five phases above, one
method each) and `make_iteration`.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import logprobs
from rlhf_jax import losses
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, abstract_params
from rlhf_jax.rollout import append_responses, last_token_scores, policy_logprobs, response_outputs
from rlhf_jax.sampling import SamplingConfig, decode_weights, sample
from rlhf_jax.train.step import guard_nonfinite, split_micro_batches


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static hyperparameters of one iteration (from `config.ppo`; see configs/ppo_ptx.py)."""
  batch_size: int  # episodes (prompts) per iteration
  prompt_len: int
  response_len: int
  temperature: float
  epochs: int
  minibatches: int
  clip_eps: float
  value_clip_eps: float
  vf_coef: float
  gamma: float
  lam: float
  whiten_rewards: bool
  missing_eos_penalty: float
  adaptive_kl: bool
  kl_target: float
  kl_horizon: float
  ptx_coef: float
  ptx_rows: int  # pretraining rows per iteration (split over the minibatches)
  ema_decay: float  # 0: off
  grad_clip: float  # per-term global-norm clip of the policy gradient (0: none)
  eos_token_id: int
  pad_token_id: int
  # Memory, not the algorithm: the rollout (sampling and scoring) and each minibatch's pretraining
  # rows in this many chunks (1: all at once).
  rollout_micro_batches: int = 1
  ptx_micro_batches: int = 1
  # Decoding at scale (`sampling.decode_weights`): the policy's weights for the rollout cast to
  # rollout_dtype ('float32': as they are) and, with rollout_layout 'decode', resharded once per
  # rollout into the decode layout (tensor-parallel, replicated over data and fsdp); 'train'
  # decodes from the training layout; 'auto' is 'decode' where it fits (`decode_mesh`). Only
  # the sampled tokens depend on it: the PPO log-probs come from the training weights (step 2).
  rollout_dtype: str = "float32"
  rollout_layout: str = "train"

  @property
  def use_ptx(self):
    return self.ptx_coef != 0.0 and self.ptx_rows > 0


ROLLOUT_DTYPES = ("float32", "bfloat16")
ROLLOUT_LAYOUTS = ("train", "decode", "auto")


def check_rollout_fields(dtype, layout):
  """One-line UserError unless config.ppo.rollout_dtype / rollout_layout are known values."""
  if dtype not in ROLLOUT_DTYPES:
    raise UserError(f"config.ppo.rollout_dtype must be one of {ROLLOUT_DTYPES}, got {dtype!r}")
  if layout not in ROLLOUT_LAYOUTS:
    raise UserError(f"config.ppo.rollout_layout must be one of {ROLLOUT_LAYOUTS}, got "
                    f"{layout!r}")


def decode_mesh(cfg: ModelConfig, s: Settings, mesh):
  """The mesh the rollout's weights are resharded on (`sampling.decode_weights`), or None to
  decode from the training layout: rollout_layout 'decode', or 'auto' where the decode copy
  takes at most a quarter of each device's memory (`sharding.decode_layout_fits`)."""
  if mesh is None or s.rollout_layout == "train":
    return None
  if s.rollout_layout == "auto" and not sharding.decode_layout_fits(
      abstract_params(cfg.replace(scan_layers=False), "lm", boxed=True), s.rollout_dtype, mesh):
    return None
  return mesh


def _unsplit(x):
  """Inverse of `step.split_micro_batches`: (M, B/M, ...) -> (B, ...)."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def clip_by_global_norm(grads, norm, max_norm):
  """grads * min(1, max_norm / norm), `norm` = |grads| (global L2 norm over the leaves); as
  `optax.clip_by_global_norm` computes it (a select, so a norm below max_norm is bit-exact).
  max_norm 0: no clip."""
  if not max_norm:
    return grads
  return jax.tree.map(lambda g: jax.lax.select(norm < max_norm, g,
                                               (g / norm.astype(g.dtype)) * max_norm), grads)


class _Iteration:
  """The phases of one PPO-ptx iteration (see the module docstring and `make_iteration`), each a
  traceable function of its inputs; `__call__` runs them in order."""

  def __init__(self, policy_cfg, value_cfg, rm_cfg, s: Settings, txs, mesh, score_fn):
    self.policy_cfg, self.value_cfg, self.rm_cfg, self.s = policy_cfg, value_cfg, rm_cfg, s
    self.txs, self.mesh, self.score_fn = txs, mesh, score_fn
    self.decode_mesh = decode_mesh(policy_cfg, s, mesh)
    # A float32 rollout's log-probs and entropies are the policy's own (the sampler's forward
    # with the KV cache equals a full forward up to float rounding, tests/test_ppo.py), so the
    # scoring pass does not forward the policy again; a reduced-precision rollout's are not.
    self.sampler_logprobs = s.rollout_dtype == "float32"
    self.sc = SamplingConfig(max_new_tokens=s.response_len, temperature=s.temperature,
                             eos_token_id=s.eos_token_id, pad_token_id=s.pad_token_id,
                             entropy=self.sampler_logprobs)

  def __call__(self, state, frozen, batch, rng):
    params = state["params"]
    sample_rng, shuffle_rng = jax.random.split(rng)
    out, tokens, seg, has_eos = self.rollout(params["policy"], batch, sample_rng)
    mask = out.mask
    scored, first_values = self.score(params, frozen, tokens, seg, out)
    penalised, seq_kl, data = self.episodes(tokens, seg, mask, scored, has_eos, state["kl_coef"])
    updated, per_mb = self.optimize(params, state, data, batch, shuffle_rng, first_values)
    new_state, kl = self.next_state(state, updated, seq_kl, batch["prompts"].shape[0])
    _, entropy, _, values, scores = scored
    metrics = self.metrics(state, out, has_eos, mask, entropy, values, data["returns"], scores,
                           penalised, seq_kl, kl, per_mb)
    per_minibatch = {k: per_mb[k] for k in ("approx_kl", "ratio_dev", "loss", "nonfinite",
                                            "tokens")}
    return new_state, metrics, (per_minibatch, out.tokens, out.lengths)

  # 1. rollout
  def rollout(self, policy_params, batch, sample_rng):
    """(sampler output, prompt ++ response tokens, their segment ids, whether each has EOS)."""
    prompts, prompt_seg = batch["prompts"], batch["prompt_segment_ids"]
    chunks, cfg, s = self.s.rollout_micro_batches, self.policy_cfg, self.s
    if s.rollout_dtype != "float32" or self.decode_mesh is not None:   # once, before any chunk
      cfg, policy_params = decode_weights(
          policy_params, cfg, "" if s.rollout_dtype == "float32" else s.rollout_dtype,
          self.decode_mesh)
    if chunks == 1:
      out = sample(policy_params, cfg, prompts, prompt_seg, sample_rng, self.sc)
    else:   # chunk c = rows c, c + chunks, ... (split_micro_batches), sampled one after another
      b = prompts.shape[0]
      rows = {"prompts": prompts, "segment_ids": prompt_seg, "index": jnp.arange(b)}
      out = jax.tree.map(_unsplit, jax.lax.map(
          lambda c: sample(policy_params, cfg, c["prompts"], c["segment_ids"],
                           sample_rng, self.sc, batch_rows=c["index"], total_batch=b),
          split_micro_batches(rows, chunks, self.mesh)))
    mask = out.mask
    tokens, seg = append_responses(prompts, prompt_seg, out.tokens, mask)
    has_eos = jnp.any((out.tokens == self.s.eos_token_id) & (mask > 0), axis=1)
    return out, tokens, seg, has_eos

  # 2. score, on the minibatch split of the first epoch
  def values_of(self, value_params, mb):
    """The value function on one minibatch: (B, N), the state before each response token."""
    return response_outputs(self.value_cfg, "scalar", value_params, mb["tokens"],
                            mb["segment_ids"], self.s.prompt_len)

  def score(self, params, frozen, tokens, seg, out):
    """((old log-probs, entropy, reference log-probs, old values (masked), scores), first_values)
    of the rollout, computed minibatch by minibatch; the old log-probs and entropy are the
    sampler's (`sampler_logprobs`) or a policy forward's.

    The first chunk is the first update's minibatch (when the chunks are the minibatches), and
    no parameter changes before that update: its value forward is taken with `jax.vjp` and
    handed to it (first_values = (values, vjp)), which then runs no value forward of its own.
    None otherwise."""
    s, p_len = self.s, self.s.prompt_len

    def one(mb, values=None):
      if self.sampler_logprobs:
        logp, entropy = mb["logp"], mb["entropy"]
      else:
        logp, entropy = policy_logprobs(self.policy_cfg, params["policy"], mb["tokens"],
                                        mb["segment_ids"], p_len, s.temperature)
      ref_logp, _ = policy_logprobs(self.policy_cfg, frozen["ref"], mb["tokens"],
                                    mb["segment_ids"], p_len, s.temperature)
      if values is None:
        values = self.values_of(params["value"], mb)
      if self.score_fn is None:
        scores = last_token_scores(self.rm_cfg, frozen["rm"], mb["tokens"], mb["segment_ids"],
                                   p_len, mb["lengths"])
      else:
        scores = self.score_fn(mb["tokens"], mb["lengths"], p_len).astype(jnp.float32)
      return logp, entropy, ref_logp, values, scores
    rollout = {"tokens": tokens, "segment_ids": seg, "lengths": out.lengths}
    if self.sampler_logprobs:
      rollout.update(logp=out.logprobs, entropy=out.entropy)
    chunks = max(s.minibatches, s.rollout_micro_batches)
    split = split_micro_batches(rollout, chunks, self.mesh)
    if chunks != s.minibatches:   # chunk 0 is not minibatch 0
      outs, first_values = jax.lax.map(one, split), None
    else:
      mb0 = jax.tree.map(lambda x: x[0], split)
      first_values = jax.vjp(lambda p: self.values_of(p, mb0), params["value"])
      outs = jax.tree.map(lambda x: x[None], one(mb0, first_values[0]))
      if chunks > 1:
        rest = jax.lax.map(one, jax.tree.map(lambda x: x[1:], split))
        outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, rest)
    logp, entropy, ref_logp, values, scores = jax.tree.map(_unsplit, outs)
    return (logp, entropy, ref_logp, values * out.mask, scores), first_values

  # 3. rewards, advantages
  def advantages(self, logp, ref_logp, values, scores, has_eos, mask, kl_coef):
    """(penalised scores, per-sequence KL, whitened advantages, returns)."""
    s = self.s
    penalised = scores - s.missing_eos_penalty * (~has_eos).astype(jnp.float32)
    rewards, seq_kl = losses.kl_penalty_rewards(logp, ref_logp, penalised, mask, kl_coef)
    if s.whiten_rewards:
      rewards = losses.whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae(rewards, values, mask, s.gamma, s.lam)
    advantages = losses.whiten(advantages, mask)
    return penalised, seq_kl, advantages, returns

  def episodes(self, tokens, seg, mask, scored, has_eos, kl_coef):
    """(penalised scores, per-sequence KL, the episodes the updates read: tokens, segment_ids,
    mask, old_logp, old_values, advantages, returns) from the rollout and its `score` outputs."""
    logp, _, ref_logp, values, scores = scored
    penalised, seq_kl, advantages, returns = self.advantages(
        logp, ref_logp, values, scores, has_eos, mask, kl_coef)
    return penalised, seq_kl, {"tokens": tokens, "segment_ids": seg, "mask": mask,
                               "old_logp": logp, "old_values": values,
                               "advantages": advantages, "returns": returns}

  # 4. epochs x minibatches
  def optimize(self, params, state, data, batch, shuffle_rng, first_values=None):
    """((params, opt_state, ema) after every minibatch update, per-minibatch aux (E*M, ...)).
    first_values: the first minibatch's value forward from `score` (values, vjp), or None (the
    first update runs its own)."""
    s, m, b = self.s, self.s.minibatches, data["tokens"].shape[0]
    if s.use_ptx:
      ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")}
      ptx = split_micro_batches(ptx, m, self.mesh)
    else:
      ptx = jnp.zeros((m,), jnp.float32)   # an unused scan input
    carry = (params, state["opt_state"], state.get("ema"))
    # Epoch 0 in the rollout's order: its first update (the one before any parameter change)
    # on its own, with the scoring pass's value forward when there is one, then the rest.
    mbs = split_micro_batches(data, m, self.mesh)
    carry, aux = self.update(carry, jax.tree.map(lambda x: x[0], (mbs, ptx)), first=True,
                             first_values=first_values)
    per_mb = [jax.tree.map(lambda x: x[None], aux)]
    if m > 1:
      carry, aux = jax.lax.scan(self.update, carry, jax.tree.map(lambda x: x[1:], (mbs, ptx)))
      per_mb.append(aux)

    def epoch(carry, e):   # the later epochs, each in its own shuffled order
      perm = jax.random.permutation(jax.random.fold_in(shuffle_rng, e), b)
      mbs = split_micro_batches(jax.tree.map(lambda x: x[perm], data), m, self.mesh)
      return jax.lax.scan(self.update, carry, (mbs, ptx))
    if s.epochs > 1:
      carry, aux = jax.lax.scan(epoch, carry, jnp.arange(1, s.epochs))
      per_mb.append(jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), aux))
    return carry, jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_mb)

  def ppo_term(self, params, mb, first, values=None):
    """policy loss + vf_coef x value loss on one minibatch of episodes. On the `first` update
    (no parameter has changed since the rollout) the old log-probs are this forward's own, held
    constant: the ratio is exactly 1 there, whatever computed mb['old_logp']. values: the value
    function's outputs if already computed (then params['value'] is not read)."""
    s, p_len = self.s, self.s.prompt_len
    logp, _ = policy_logprobs(self.policy_cfg, params["policy"], mb["tokens"], mb["segment_ids"],
                              p_len, s.temperature)   # (the unused entropy is compiled away)
    old_logp = jax.lax.stop_gradient(logp) if first else mb["old_logp"]
    pg_sum, count, stats = losses.ppo_policy_loss(logp, old_logp, mb["advantages"],
                                                  mb["mask"], s.clip_eps)
    if values is None:
      values = self.values_of(params["value"], mb)
    vf_sum, _ = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mb["mask"],
                                      s.value_clip_eps)
    denom = jnp.maximum(count, 1.0)
    policy_loss, value_loss = pg_sum / denom, vf_sum / denom
    mask = mb["mask"]
    aux = {"policy_loss": policy_loss, "value_loss": value_loss,
           "tokens": count, "clipped": stats["clipped_sum"], "approx_kl": stats["approx_kl_sum"],
           "ratio_sum": stats["ratio_sum"], "ratio_max": stats["ratio_max"],
           "ratio_dev": jnp.max(jnp.abs(jnp.exp(losses.clamped_log_ratio(
               logp, old_logp)) - 1.0) * mask)}
    return policy_loss + s.vf_coef * value_loss, aux

  def ptx_term(self, policy_params, ptx):
    """ptx_coef x the LM loss on this minibatch's pretraining rows (the policy only)."""
    ptx_sum, ptx_count = logprobs.lm_loss(self.policy_cfg, policy_params, ptx)
    ptx_loss = ptx_sum / jnp.maximum(ptx_count, 1.0)
    return self.s.ptx_coef * ptx_loss, ptx_loss

  def ptx_grad(self, policy_params, ptx):
    """((ptx_coef x the LM loss, the LM loss), its policy gradient) on this minibatch's rows; in
    `ptx_micro_batches` chunks: grad(sum of the chunks' loss sums) / (sum of their token counts),
    accumulated over the chunks (`lax.scan`), which is the gradient of the one-pass mean."""
    chunks = self.s.ptx_micro_batches
    if chunks == 1:
      return jax.value_and_grad(self.ptx_term, has_aux=True)(policy_params, ptx)

    def sum_and_count(params, rows):
      return logprobs.lm_loss(self.policy_cfg, params, rows)

    def body(acc, rows):
      (total, count), grad = jax.value_and_grad(sum_and_count, has_aux=True)(policy_params, rows)
      return jax.tree.map(jnp.add, acc, (grad, total, count)), None
    zero = (jax.tree.map(jnp.zeros_like, policy_params), jnp.float32(0), jnp.float32(0))
    (grad, total, count), _ = jax.lax.scan(body, zero,
                                           split_micro_batches(ptx, chunks, self.mesh))
    denom = jnp.maximum(count, 1.0)
    ptx_loss = total / denom
    scale = self.s.ptx_coef / denom
    return (self.s.ptx_coef * ptx_loss, ptx_loss), jax.tree.map(lambda g: g * scale, grad)

  def update(self, carry, xs, first=False, first_values=None):
    """One minibatch xs = (episodes, ptx rows): both terms' gradients, each policy term clipped
    by its own norm, both AdamW steps and the EMA, all kept only when the loss and gradient are
    finite. first: the update before any parameter change (`ppo_term`).
    first_values: (values, vjp) of this minibatch's value forward at these parameters (`score`):
    the value gradient is that forward's vjp of the loss's gradient in the values."""
    s, txs = self.s, self.txs
    params, opt_state, ema = carry
    mb, ptx = xs
    if first_values is None:
      (loss, aux), grads = jax.value_and_grad(lambda p: self.ppo_term(p, mb, first),
                                              has_aux=True)(params)
    else:
      values, value_vjp = first_values
      (loss, aux), (g_policy, g_values) = jax.value_and_grad(
          lambda p, v: self.ppo_term({"policy": p}, mb, first, v), argnums=(0, 1),
          has_aux=True)(params["policy"], values)
      grads = {"policy": g_policy, "value": value_vjp(g_values)[0]}
    g_ppo = grads["policy"]
    aux["grad_norm_ppo"] = optax.tree.norm(g_ppo)
    if s.use_ptx:
      (ptx_value, aux["ptx_loss"]), g_ptx = self.ptx_grad(params["policy"], ptx)
      aux["grad_norm_ptx"] = optax.tree.norm(g_ptx)
      loss = loss + ptx_value
      grad_norm = optax.tree.norm({"policy": jax.tree.map(jnp.add, g_ppo, g_ptx),
                                   "value": grads["value"]})
    else:
      grad_norm = optax.tree.norm(grads)

    def apply():   # (run only when the loss and the gradient norm are finite)
      g_policy = clip_by_global_norm(g_ppo, aux["grad_norm_ppo"], s.grad_clip)
      if s.use_ptx:
        g_policy = jax.tree.map(jnp.add, g_policy,
                                clip_by_global_norm(g_ptx, aux["grad_norm_ptx"], s.grad_clip))
      new_params, new_opt = {}, {}
      for name, g in (("policy", g_policy), ("value", grads["value"])):
        upd, new_opt[name] = txs[name].update(g, opt_state[name], params[name])
        new_params[name] = optax.apply_updates(params[name], upd)
      new_ema = None if ema is None else jax.tree.map(
          lambda e_, p: s.ema_decay * e_ + (1 - s.ema_decay) * p, ema, new_params["policy"])
      return new_params, new_opt, new_ema
    (params, opt_state, ema), finite = guard_nonfinite((params, opt_state, ema), apply, loss,
                                                       grad_norm)
    aux = dict(aux, loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return (params, opt_state, ema), aux

  # 5. KL coefficient (the EMA moved with every applied update in step 4)
  def next_state(self, state, updated, seq_kl, b):
    """(the new state, the rollout's mean KL)."""
    s = self.s
    new_params, new_opt, new_ema = updated
    kl = jnp.mean(seq_kl)
    kl_coef = state["kl_coef"]
    if s.adaptive_kl:
      kl_coef = losses.adaptive_kl_coef(kl_coef, kl, s.kl_target, s.kl_horizon, b)
    new_state = {"params": new_params, "opt_state": new_opt, "step": state["step"] + 1,
                 "kl_coef": kl_coef}
    if "ema" in state:
      new_state["ema"] = new_ema
    return new_state, kl

  def metrics(self, state, out, has_eos, mask, entropy, values, returns, scores, penalised,
              seq_kl, kl, per_mb):
    """The iteration's metrics (means over the rollout and over the minibatch updates)."""
    tok = jnp.maximum(per_mb["tokens"].sum(), 1.0)
    metrics = {
        "reward": jnp.mean(scores), "kl": kl, "kl_coef": state["kl_coef"],
        "objective": jnp.mean(penalised - state["kl_coef"] * seq_kl),
        "entropy": losses.masked_mean(entropy, mask),
        "eos_rate": jnp.mean(has_eos.astype(jnp.float32)),
        "response_length": jnp.mean(out.lengths.astype(jnp.float32)),
        "value_mean": losses.masked_mean(values, mask),
        "return_mean": losses.masked_mean(returns, mask),
        "approx_kl": per_mb["approx_kl"].sum() / tok,
        "clip_frac": per_mb["clipped"].sum() / tok,
        "ratio_mean": per_mb["ratio_sum"].sum() / tok,
        "ratio_max": jnp.max(per_mb["ratio_max"]),
        "policy_loss": jnp.mean(per_mb["policy_loss"]),
        "value_loss": jnp.mean(per_mb["value_loss"]),
        "grad_norm": jnp.mean(per_mb["grad_norm"]),
        "grad_norm_ppo": jnp.mean(per_mb["grad_norm_ppo"]),
        "nonfinite": jnp.sum(per_mb["nonfinite"]),
    }
    if self.s.use_ptx:   # (plain PPO computes no pretraining loss: no metric rather than a 0)
      metrics["ptx_loss"] = jnp.mean(per_mb["ptx_loss"])
      metrics["grad_norm_ptx"] = jnp.mean(per_mb["grad_norm_ptx"])
    return metrics


def make_iteration(policy_cfg: ModelConfig, value_cfg: ModelConfig, rm_cfg: ModelConfig,
                   s: Settings, txs, mesh=None, score_fn=None):
  """The pure PPO-ptx iteration `iteration(state, frozen, batch, rng) -> (state, metrics,
  (per_minibatch, response tokens, lengths))` (see the module docstring; the phases are the
  methods of `_Iteration`). txs = {'policy': tx, 'value': tx}; the policy tx must not clip (the
  iteration clips each term to `s.grad_clip`).

  batch: {'prompts', 'prompt_segment_ids'} (B, P) left-padded, and with ptx the pretraining rows
  {'ptx_tokens', 'ptx_segment_ids', 'ptx_positions', 'ptx_loss_mask'} (ptx_rows, S).
  score_fn(tokens (B, P + N) int32, lengths (B,), prompt_len) -> (B,) float32, traceable: the
  reward of each finished episode (prompt then response, `lengths` real response tokens, EOS
  included). None: the reward model `frozen['rm']` (config `rm_cfg`) at the last token. With a
  score_fn, `frozen` needs no 'rm' and rm_cfg is unused.
  """
  phases = _Iteration(policy_cfg, value_cfg, rm_cfg, s, txs, mesh, score_fn)

  def iteration(state, frozen, batch, rng):
    return phases(state, frozen, batch, rng)
  return iteration
