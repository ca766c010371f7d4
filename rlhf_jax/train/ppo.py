"""Stage 3: PPO-ptx, InstructGPT's reinforcement learning from the reward model.

Objective (Ouyang et al. 2022, eq. 2), maximised over the policy pi_RL:

  E_{x ~ prompts, y ~ pi_RL(.|x)} [ r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
    + gamma * E_{x ~ D_pretrain} [ log pi_RL(x) ]

Models: the policy and the frozen reference pi_SFT start from the SFT model; the value function
starts from the reward model (same backbone + scalar head); the reward model is frozen and scores
as stored (its bias was fitted so demonstrations score 0).

Each iteration is one call of the pure jitted function of `ppo_iteration` (rollout, scoring,
rewards and advantages, the minibatch updates with per-term gradient clipping, the KL coefficient;
the formulas are there); this module is the stage around it.

The reward of a finished episode is pluggable (`ppo_iteration.make_iteration(score_fn=...)`): by
default the reward model at the last token; with `config.reward_model = 'gold'` the offline task's
gold labeler itself (`ppo_gold`: called on the host through `jax.pure_callback`, normalised like
the reward model's reward): PPO against the true objective, the upper bound of PPO on this task
(stage `ppo_oracle`).

Reading order: the config (`settings_from_config`: `ppo_iteration.Settings` from `config.ppo`,
their one source), the state (policy and value networks with their own AdamW, one pytree), the
data, the loop's step, then `run`: it loads the models and data and runs the same loop as every
other stage (`loop.run_loop`: resume, checkpoints, metrics, non-finite counter) with
`IterationStep` as its step: one iteration per loop step, metrics brought to the host with the
gold score of the samples added, the log interval averaged over every iteration
(`loop.mean_over_steps`), an iteration counted as skipped when none of its updates was applied
(`skipped_iteration`).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from rlhf_jax import distributed
from rlhf_jax import plan_compile
from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.data import gold_labeler, loaders, shards
from rlhf_jax.errors import UserError, check_positive, config_field
from rlhf_jax.models import ModelConfig, abstract_params
from rlhf_jax.train import loop
from rlhf_jax.train import optim
from rlhf_jax.train import ppo_gold
from rlhf_jax.train import ppo_iteration
from rlhf_jax.train import stage_io


# ----------------------------------------------------------------------------- config

def settings_from_config(config, tok=None):
  """`Settings` from `config.ppo` (validated first: one line naming the bad field)."""
  validate_ppo_config(config)
  p = config.ppo
  ptx_rows = p.ptx_per_episode * p.batch_size if p.ptx_coef else 0
  return ppo_iteration.Settings(
      batch_size=p.batch_size, prompt_len=p.prompt_len, response_len=p.response_len,
      temperature=float(p.temperature), epochs=p.epochs, minibatches=p.minibatches,
      clip_eps=float(p.clip_eps), value_clip_eps=float(p.value_clip_eps),
      vf_coef=float(p.vf_coef), gamma=float(p.gamma), lam=float(p.lam),
      whiten_rewards=bool(p.whiten_rewards), missing_eos_penalty=float(p.missing_eos_penalty),
      adaptive_kl=bool(p.adaptive_kl), kl_target=float(p.kl_target),
      kl_horizon=float(p.kl_horizon), ptx_coef=float(p.ptx_coef), ptx_rows=ptx_rows,
      ema_decay=float(p.ema_decay), grad_clip=float(config.optimizer.grad_clip or 0.0),
      eos_token_id=tok.eos_id if tok is not None else 2,
      pad_token_id=tok.pad_id if tok is not None else 0,
      rollout_micro_batches=p.rollout_micro_batches, ptx_micro_batches=p.ptx_micro_batches,
      rollout_dtype=p.rollout_dtype, rollout_layout=p.rollout_layout)


def validate_ppo_config(config):
  """Checks every `config.ppo` field before anything is loaded or written."""
  pos = check_positive
  for name in ("batch_size", "prompt_len", "response_len", "epochs", "minibatches",
               "num_iterations", "log_every", "checkpoint_every", "keep_checkpoints",
               "rollout_micro_batches", "ptx_micro_batches"):
    pos(config, f"ppo.{name}", kind=int)
  pos(config, "ppo.ptx_per_episode", kind=int, allow_zero=True)
  for name in ("temperature", "kl_target", "kl_horizon", "policy_lr", "value_lr"):
    pos(config, f"ppo.{name}")
  for name in ("clip_eps", "value_clip_eps", "vf_coef", "kl_coef", "ptx_coef",
               "missing_eos_penalty"):
    pos(config, f"ppo.{name}", allow_zero=True)
  for name in ("gamma", "lam", "ema_decay"):
    value = config_field(config, f"ppo.{name}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
      raise UserError(f"config.ppo.{name} must be in [0, 1], got {value!r}")
  if config.ppo.ema_decay == 1:
    raise UserError("config.ppo.ema_decay must be < 1 (0 = off), got 1")
  p = config.ppo
  if p.batch_size % p.minibatches:
    raise UserError(f"config.ppo.minibatches ({p.minibatches}) must divide config.ppo.batch_size "
                    f"({p.batch_size})")
  if p.ptx_coef and p.ptx_per_episode == 0:
    raise UserError("config.ppo.ptx_per_episode must be >= 1 when config.ppo.ptx_coef > 0")
  if p.batch_size % p.rollout_micro_batches:
    raise UserError(f"config.ppo.rollout_micro_batches ({p.rollout_micro_batches}) must divide "
                    f"config.ppo.batch_size ({p.batch_size})")
  ptx_rows = p.ptx_per_episode * p.batch_size // p.minibatches
  if p.ptx_coef and ptx_rows % p.ptx_micro_batches:
    raise UserError(f"config.ppo.ptx_micro_batches ({p.ptx_micro_batches}) must divide the "
                    f"pretraining rows of a minibatch (ptx_per_episode x batch_size / minibatches "
                    f"= {ptx_rows})")
  if p.frozen_dtype not in ("float32", "bfloat16"):
    raise UserError(f"config.ppo.frozen_dtype must be 'float32' or 'bfloat16', got "
                    f"{p.frozen_dtype!r}")
  ppo_iteration.check_rollout_fields(p.rollout_dtype, p.rollout_layout)
  if p.prompt_len + p.response_len > config.model.max_len:
    raise UserError(f"config.ppo.prompt_len + config.ppo.response_len ({p.prompt_len} + "
                    f"{p.response_len}) exceeds config.model.max_len ({config.model.max_len})")
  if p.ptx_coef and p.ptx_seq_len > config.model.max_len:
    raise UserError(f"config.ppo.ptx_seq_len ({p.ptx_seq_len}) exceeds config.model.max_len "
                    f"({config.model.max_len})")
  if ppo_gold.is_gold(config) and config.data.source != "offline":
    raise UserError(f"config.reward_model 'gold' is the offline task's gold labeler: it needs "
                    f"config.data.source 'offline', got {config.data.source!r}")
  scale = ppo_gold.gold_reward_scale(config)
  if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
    raise UserError(f"config.ppo.gold_reward_scale must be a number >= 0 (0 = normalised by the "
                    f"collect stage's statistics), got {scale!r}")


def resume_record(config):
  """The fields a PPO checkpoint must be resumed with unchanged (logging/checkpoint intervals,
  the pipeline's other stages and evaluation may differ)."""
  keep = ("model.", "ppo.", "optimizer.", "init_from", "reward_model", "value_from", "seed",
          "data_seed", "data.")
  free = ("ppo.log_every", "ppo.checkpoint_every", "ppo.keep_checkpoints", "data.dir",
          "data.prefetch", "model.remat", "model.attention_impl", "ppo.rollout_micro_batches",
          "ppo.ptx_micro_batches", "model.logits_chunk", "ppo.rollout_layout")
  return {k: v for k, v in loop.config_record(config).items()
          if k.startswith(keep) and k not in free}


def stage_name(config):
  """The stage directory under the workdir: 'ppo_oracle' with the gold labeler as the reward
  (`config.reward_model = 'gold'`), else 'ppo_ptx' with the pretraining term, 'ppo' without."""
  if ppo_gold.is_gold(config):
    return "ppo_oracle"
  return "ppo_ptx" if config.ppo.ptx_coef else "ppo"


def _optimizer(config, lr, num_iterations, s: ppo_iteration.Settings, clip=True):
  """AdamW as in `optim.make_optimizer`, the schedule counted in minibatch updates; clip=False
  leaves out the global-norm clip (the policy's: the iteration clips each term itself)."""
  opt = config.optimizer.to_dict()
  opt["lr"] = lr
  if not clip:
    opt["grad_clip"] = 0.0
  steps = num_iterations * s.epochs * s.minibatches
  return optim.make_optimizer(ConfigDict(opt), steps)[0]


def make_optimizers(config, s: ppo_iteration.Settings):
  """{'policy': AdamW without the global clip (the iteration clips each term), 'value': AdamW}."""
  p = config.ppo
  return {"policy": _optimizer(config, p.policy_lr, p.num_iterations, s, clip=False),
          "value": _optimizer(config, p.value_lr, p.num_iterations, s)}


# ----------------------------------------------------------------------------- state

def _boxed(policy_cfg, value_cfg):
  return {"policy": abstract_params(policy_cfg, "lm", boxed=True),
          "value": abstract_params(value_cfg, "scalar", boxed=True)}


def state_shardings(policy_cfg, value_cfg, txs, mesh, ema):
  boxed = _boxed(policy_cfg, value_cfg)
  out = {"params": {k: sharding.param_shardings(v, mesh) for k, v in boxed.items()},
         "opt_state": {k: sharding.opt_state_shardings(txs[k], boxed[k], mesh) for k in boxed},
         "step": sharding.replicated(mesh), "kl_coef": sharding.replicated(mesh)}
  if ema:
    out["ema"] = out["params"]["policy"]
  return out


def create_state(policy, value, txs, shardings, kl_coef):
  params = sharding.put({"policy": policy, "value": value}, shardings["params"])
  opt_state = {k: jax.jit(txs[k].init, out_shardings=shardings["opt_state"][k])(params[k])
               for k in ("policy", "value")}
  state = {"params": params, "opt_state": opt_state,
           "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
           "kl_coef": jax.device_put(jnp.asarray(kl_coef, jnp.float32), shardings["kl_coef"])}
  if "ema" in shardings:
    state["ema"] = jax.tree.map(jnp.copy, params["policy"])
  return state


def place(policy, value, rm, txs, shardings, frozen_sh, kl_coef, frozen_dtype="float32"):
  """(state, frozen) on the mesh from host or device arrays, sharing no buffer.

  The state is donated every iteration, so the frozen reference (the same weights as the policy)
  and reward model (possibly the very arrays of the value function) are copies: otherwise
  `device_put` of a jax.Array already in place returns the same buffers and the first iteration
  deletes them. rm None: no reward model (`frozen` = {'ref'}). frozen_dtype 'bfloat16' stores the
  frozen models in bfloat16 (`config.ppo.frozen_dtype`; cast on the host when they come from it).
  """
  frozen = {"ref": policy} if rm is None else {"ref": policy, "rm": rm}
  if frozen_dtype == "float32":
    frozen = jax.tree.map(jnp.copy, sharding.put(frozen, frozen_sh))
  else:
    dtype = jnp.dtype(frozen_dtype)
    host = jax.tree.map(lambda x: x.astype(dtype) if isinstance(x, np.ndarray) else x, frozen)
    frozen = jax.tree.map(lambda x: jnp.copy(x) if x.dtype == dtype else x.astype(dtype),
                          sharding.put(host, frozen_sh))
  return create_state(policy, value, txs, shardings, kl_coef), frozen


def jit_iteration(iteration, state_sh, frozen_sh, batch_example, mesh):
  rep = sharding.replicated(mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch_example.items()}
  return jax.jit(iteration, in_shardings=(state_sh, frozen_sh, batch_sh, rep),
                 out_shardings=(state_sh, rep, rep), donate_argnums=0)


# ----------------------------------------------------------------------------- data

class _Batches:
  """Prompt batches (and pretraining rows with ptx) for one iteration; resumable."""

  def __init__(self, prompts, ptx):
    self.prompts, self.ptx = prompts, ptx

  def __next__(self):
    batch = next(self.prompts)
    out = {"prompts": batch["tokens"], "prompt_segment_ids": batch["segment_ids"],
           "index": batch["index"]}
    if self.ptx is not None:
      rows = next(self.ptx)
      out.update({f"ptx_{k}": rows[k] for k in ("tokens", "segment_ids", "positions",
                                                 "loss_mask")})
    return out

  def get_state(self):
    return {"prompts": self.prompts.get_state(),
            "ptx": None if self.ptx is None else self.ptx.get_state()}

  def set_state(self, state):
    self.prompts.set_state(state["prompts"])
    if self.ptx is not None:
      self.ptx.set_state(state["ptx"])

  def close(self):
    for it in (self.prompts, self.ptx):
      if it is not None and hasattr(it, "close"):
        it.close()


# ----------------------------------------------------------------------------- the loop's step

class IterationStep:
  """The loop's `step` hook for PPO: `(state, host batch, rng) -> (state, metrics)`.

  Runs one jitted iteration (`make_iteration`, jitted at the first batch) on this process's
  prompt rows (and pretraining rows) placed on the mesh, and brings its metrics to the host. With
  `gold` (the offline task's `gold_score`), adds `gold_score`: the mean gold score of all the
  responses of the iteration (the responses come back to every process; the prompts' record
  indices are gathered from all of them), and keeps the first four episodes as `samples` (those
  of the last iteration are saved with the final model).
  """

  def __init__(self, iteration, shardings, frozen, frozen_sh, mesh, s: ppo_iteration.Settings,
               gold=None, prompt_source=None, tok=None):
    self.iteration, self.shardings = iteration, shardings
    self.frozen, self.frozen_sh = frozen, frozen_sh
    self.mesh, self.s, self.gold, self.prompt_source, self.tok = mesh, s, gold, prompt_source, tok
    self.samples = []
    self._jitted = None

  def jitted(self, host):
    """The jitted iteration for batches with the keys and ranks of `host` (without 'index');
    built once (the memory check lowers this same function)."""
    if self._jitted is None:
      self._jitted = jit_iteration(self.iteration, self.shardings, self.frozen_sh, host,
                                   self.mesh)
    return self._jitted

  def __call__(self, state, host, rng):
    index = host.pop("index")
    jitted = self.jitted(host)
    batch = {k: sharding.global_batch(v, self.mesh, self.s.batch_size if not k.startswith("ptx_")
                                      else self.s.ptx_rows) for k, v in host.items()}
    with sharding.activate(self.mesh):
      state, metrics, (_, resp, lengths) = jitted(state, self.frozen, batch, rng)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if self.gold is not None:
      metrics["gold_score"] = self._gold_score(index, resp, lengths)
    return state, metrics

  def _gold_score(self, index, resp, lengths):
    resp, lengths = np.asarray(resp), np.asarray(lengths)    # every row (replicated)
    texts = [loaders.text_of(self.prompt_source[int(i)]["prompt"])
             for i in distributed.gather_rows(index)]
    answers = [rollout.decode_response(self.tok, resp[i], int(lengths[i]))
               for i in range(len(texts))]
    scores = [self.gold(t, a) for t, a in zip(texts, answers)]
    self.samples = [{"prompt": t, "response": a, "gold": g}
                    for t, a, g in list(zip(texts, answers, scores))[:4]]
    return float(np.mean(scores))


def skipped_iteration(s: ppo_iteration.Settings):
  """The loop's `skipped` hook: an iteration none of whose updates was finite counts as skipped
  (too many in a row stop the run before anything of the bad stretch is saved)."""
  return lambda metrics: metrics["nonfinite"] >= s.epochs * s.minibatches


# ----------------------------------------------------------------------------- the stage

def _model_paths(config, workdir):
  """(init_from, reward model path or 'gold', value_from) with 'auto' resolved."""
  init_from = stage_io.resolve_auto(config.init_from, workdir, "sft", "init_from")
  gold_reward = ppo_gold.is_gold(config)
  rm_path = "gold" if gold_reward else stage_io.resolve_auto(config.reward_model, workdir, "rm",
                                                             "reward_model")
  value_path = stage_io.resolve_auto(config.value_from, workdir, "rm", "value_from")
  return init_from, rm_path, value_path


def _check_ptx_rows(s: ppo_iteration.Settings, mesh):
  if s.use_ptx:
    sharding.check_batch_size(s.ptx_rows // s.minibatches // s.ptx_micro_batches, mesh,
                              "config.ppo.ptx_per_episode x batch_size / minibatches / "
                              "ptx_micro_batches")
    if s.ptx_rows % s.minibatches:
      raise UserError(f"config.ppo.minibatches ({s.minibatches}) must divide the pretraining "
                      f"rows per iteration ({s.ptx_rows})")


def _batches(config, tfds_dir, prompt_source, tok, s: ppo_iteration.Settings, mesh):
  """This process's prompt batches (and pretraining rows with ptx) from its data shards
  (`config.data.shards`), resumable."""
  p = config.ppo
  local = lambda n: stage_io.local_batch_size(mesh, n)
  num_shards = config.data.get("shards", 0)
  prompts = shards.ShardedBatches(
      lambda shard, rows: loaders.prompt_loader(prompt_source, tok, batch_size=rows,
                                                prompt_len=p.prompt_len, seed=config.data_seed,
                                                shard=shard),
      local(p.batch_size), num_shards, tok.pad_id, "ppo.batch_size")
  ptx_it = None
  if s.use_ptx:
    ptx_source = stage_io.load_split(tfds_dir, "ptx", config.data.train_split, "train_split")
    ptx_it = shards.ShardedBatches(
        lambda shard, rows: loaders.ptx_loader(ptx_source, tok, batch_size=rows,
                                               seq_len=p.ptx_seq_len, seed=config.data_seed + 1,
                                               shard=shard),
        local(s.ptx_rows), num_shards, tok.pad_id, "ppo.ptx_per_episode")
  return _Batches(prompts, ptx_it)


def run(config, workdir):
  """Runs PPO (ptx_coef 0, in `<workdir>/ppo`), PPO-ptx (in `<workdir>/ppo_ptx`), or PPO against
  the gold labeler (`config.reward_model = 'gold'`, in `<workdir>/ppo_oracle`)."""
  validate_ppo_config(config)
  name = stage_name(config)
  workdir = stage_io.check_workdir(workdir)
  final = stage_io.finished(workdir, name)
  if final:
    return final
  p = config.ppo
  cfg = ModelConfig.from_dict(config.model).replace(dropout_resid=0.0, dropout_attn=0.0)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(p.batch_size // p.minibatches, mesh,
                            "config.ppo.batch_size / config.ppo.minibatches")
  sharding.check_batch_size(p.batch_size // p.rollout_micro_batches, mesh,
                            "config.ppo.batch_size / config.ppo.rollout_micro_batches")
  init_from, rm_path, value_path = _model_paths(config, workdir)
  tfds_dir, data_tok_dir = stage_io.data_paths(config, workdir)

  # The models: policy and frozen reference from SFT, value function and reward from the RM.
  policy_params, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from",
                                                          mesh)
  rm_cfg, rm_params = (None, None) if rm_path == "gold" else \
      stage_io.load_scalar_model(rm_path, cfg, "reward_model", mesh)
  value_cfg, value_params = (rm_cfg, rm_params) if value_path == rm_path else \
      stage_io.load_scalar_model(value_path, cfg, "value_from", mesh)
  tok, tok_dir = stage_io.load_tokenizer_for(config, model_tok_dir, data_tok_dir, cfg)
  s = settings_from_config(config, tok)
  _check_ptx_rows(s, mesh)
  txs = make_optimizers(config, s)
  shardings = state_shardings(cfg, value_cfg, txs, mesh, ema=s.ema_decay > 0)
  frozen_sh = {"ref": shardings["params"]["policy"]}
  if rm_cfg is not None:
    frozen_sh["rm"] = sharding.param_shardings(abstract_params(rm_cfg, "scalar", boxed=True),
                                               mesh)
  state, frozen = place(policy_params, value_params, rm_params, txs, shardings, frozen_sh,
                        p.kl_coef, p.frozen_dtype)
  del policy_params, value_params, rm_params

  # The one loop, one iteration per step.
  prompt_source = stage_io.load_split(tfds_dir, "prompts", config.data.train_split, "train_split")
  score_fn, gold_norm = ppo_gold.gold_reward(config, workdir, prompt_source, tok)
  batches = _batches(config, tfds_dir, prompt_source, tok, s, mesh)
  iteration = ppo_iteration.make_iteration(cfg, value_cfg, rm_cfg, s, txs, mesh, score_fn)
  step = IterationStep(iteration, shardings, frozen, frozen_sh, mesh, s,
                       gold=gold_labeler.gold_score if config.data.source == "offline" else None,
                       prompt_source=prompt_source, tok=tok)
  task = loop.Task(name=name, step=step, train_batches=lambda: batches,
                   rng=jax.random.key(config.seed + 2), record=resume_record(config),
                   reduce=loop.mean_over_steps, skipped=skipped_iteration(s), unit="iteration",
                   rate_key="iters_per_s", config=config)
  task.check_memory = plan_compile.ppo_memory_check(
      step, frozen, plan_compile.ppo_batch(s, p.ptx_seq_len, mesh), mesh)
  cadence = loop.Cadence(num_steps=p.num_iterations, log_every=p.log_every,
                         checkpoint_every=p.checkpoint_every,
                         keep_checkpoints=p.keep_checkpoints,
                         max_nonfinite_steps=config.max_nonfinite_steps)
  reward = (f"the gold labeler, {gold_norm['scale']:.3f} x (gold - {gold_norm['shift']:.3f})"
            if gold_norm else f"reward model {rm_path}")
  print(f"{name}: policy {cfg.num_layers}x{cfg.d_model} from {init_from}, value from "
        f"{value_path}, {reward}; {p.num_iterations} iterations of "
        f"{p.batch_size} episodes x {p.response_len} tokens, {p.epochs} epoch(s) x "
        f"{p.minibatches} minibatch(es), ptx_coef {s.ptx_coef}, mesh {dict(mesh.shape)}; "
        f"writing {os.path.join(workdir, name)}", flush=True)
  state, _, _ = loop.run_loop(task, state, cadence, workdir, mesh)

  params = state["ema"] if "ema" in state else state["params"]["policy"]
  meta = {"stage": name, "iterations": p.num_iterations, "init_from": init_from,
          "reward_model": rm_path, "value_from": value_path, "ptx_coef": s.ptx_coef,
          "gold_reward": gold_norm, "final_kl_coef": float(state["kl_coef"]),
          "ema_decay": s.ema_decay, "settings": dataclasses.asdict(s), "samples": step.samples}
  path = stage_io.save_final(os.path.join(workdir, name), cfg, params, "lm", tok_dir, meta)
  print(f"{name}: final model written to {path}", flush=True)
  return path

