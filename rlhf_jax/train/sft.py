"""Stage 1 (SFT) and the offline base-model pretraining: next-token loss on packed rows.

  sft       demonstrations `[bos] prompt response [eos]` packed into rows; the loss covers the
            response tokens and eos only (the prompt is masked), as in InstructGPT.
  pretrain  the same step on pretraining text with every token a target: there is no
            downloadable base model offline, so the `tiny` pipeline pretrains its own on the
            offline task's text first.

Reading order: `make_loss_fn` is the stage's loss; `run` wires it into the one train step
(`step.TrainStep`: `train_step(state, batch, rng) -> (state, metrics)`, pure, jitted with
explicit shardings, the state donated, gradient accumulation by `lax.scan` over micro-batches
summing (loss_sum, token count)), AdamW with warmup + cosine decay to 10% (`optim`), residual
dropout from `config.model.dropout_resid` (paper SFT: 0.2), and runs the one loop
(`loop.run_loop`: logging, evaluation, checkpoints, resume).

Validation: the mean token loss over the whole validation split (prompt-masked for sft), every
`eval_every` steps. Optional model selection (`config.select_by_rm.rm_path`): at each evaluation
the policy answers validation prompts greedily, the reward model scores the answers, and the final
model is the evaluated weights with the best mean reward instead of the last ones.
"""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import logprobs
from rlhf_jax import plan_compile
from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.data import encoding, loaders, shards
from rlhf_jax.errors import UserError, check_positive
from rlhf_jax.models import ModelConfig
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import loop
from rlhf_jax.train import optim
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import TrainStep, jit_eval_step

TRAIN_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def make_loss_fn(cfg: ModelConfig):
  """(params, batch, rng) -> (token loss sum, target count, {}): the masked next-token loss."""
  def loss_fn(params, batch, rng):
    loss_sum, count = logprobs.lm_loss(cfg, params, batch, rng=rng, train=True)
    return loss_sum, count, {}
  return loss_fn


def make_eval_fn(cfg: ModelConfig):
  def eval_fn(params, batch):
    return logprobs.lm_loss(cfg, params, batch)
  return eval_fn


def _kind(stage):
  return "ptx" if stage == "pretrain" else "sft"


def _loader(kind, source, tok, batch_size, seq_len, *, seed, train, prefetch=0, shard=None):
  if kind == "ptx":
    return loaders.ptx_loader(source, tok, batch_size=batch_size, seq_len=seq_len, seed=seed,
                              num_epochs=None if train else 1, shuffle=train, prefetch=prefetch,
                              shard=shard)
  if train:
    return loaders.sft_loader(source, tok, batch_size=batch_size, seq_len=seq_len, seed=seed,
                              prefetch=prefetch, shard=shard)
  # Validation: one demonstration per row and every record exactly once.
  return loaders.sft_loader(source, tok, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            num_epochs=1, shuffle=False, pack=False, drop_remainder=False,
                            shard=shard)


def process_batches(config, kind, source, tok, mesh, batch_size, field, *, train):
  """This process's rows of the global batches of `batch_size` (`shards.ShardedBatches` over its
  data shards, `config.data.shards`)."""
  def make(shard, rows):
    return _loader(kind, source, tok, rows, config.seq_len, seed=config.data_seed, train=train,
                   prefetch=config.data.prefetch if train else 0, shard=shard)
  return shards.ShardedBatches(make, stage_io.local_batch_size(mesh, batch_size),
                               config.data.get("shards", 0), tok.pad_id, field)


def estimate_steps(config, source, tok, kind):
  """Steps for `config.num_epochs` over a packed split: tokens of a sample of records / seq_len."""
  n = len(source)
  sample = range(0, n, max(1, n // 512))
  total = 0
  for i in sample:
    r = source[i]
    if kind == "ptx":
      total += min(len(tok.encode(loaders.text_of(r["text"]))) + 2, 64 * config.seq_len)
    else:
      doc = encoding.sft_document(tok.encode(loaders.text_of(r["prompt"])),
                                  tok.encode(loaders.text_of(r["response"])),
                                  tok.bos_id, tok.eos_id, config.seq_len)
      total += 0 if doc is None else len(doc["tokens"])
  rows = total * n / len(sample) / config.seq_len
  return max(1, int(np.ceil(config.num_epochs * rows / config.batch_size)))


class EvalSet:
  """Host batches of a validation split, read once and reused at every evaluation (every process
  the same number of them: `shards.lockstep`)."""

  def __init__(self, loader, mesh, batch_size, keys, max_batches, pad_id=0):
    self.mesh, self.batch_size = mesh, batch_size
    self.batches = []
    for i, batch in enumerate(shards.lockstep(loader, pad_id, "the validation split")):
      if max_batches and i >= max_batches:
        break
      self.batches.append({k: batch[k] for k in keys})
    if not self.batches:
      raise UserError("the validation split gave no batch (is it smaller than eval_batch_size "
                      "for packed pretraining text?)")

  def __iter__(self):
    for batch in self.batches:
      yield batch, sharding.global_batch(batch, self.mesh, self.batch_size)


def make_evaluate(cfg, eval_set, param_shardings, mesh, selector=None):
  """(params) -> {'loss': mean token loss over `eval_set`, 'tokens'} (+ the selector's reward)."""
  eval_step = None

  def evaluate(params):
    nonlocal eval_step
    total, count = 0.0, 0.0
    for local, batch in eval_set:
      if eval_step is None:
        eval_step = jit_eval_step(make_eval_fn(cfg), param_shardings, local, mesh)
      s, c = jax.device_get(eval_step(params, batch))
      total, count = total + float(s), count + float(c)
    out = {"loss": total / max(count, 1.0), "tokens": count}
    out.update(selector.score(params) if selector else {})
    return out
  return evaluate


def run(config, workdir):
  """Runs the 'pretrain' or 'sft' stage named by `config.stage` in `<workdir>/<stage>`."""
  stage = config.stage
  setup = stage_io.begin_stage(config, workdir, stage, "" if stage == "pretrain" else "pretrain")
  if setup is None:
    return stage_io.final_model_dir(workdir, stage)
  cfg, mesh, init_from = setup.cfg, setup.mesh, setup.init_from
  loaded, model_tok_dir = None, None
  if init_from:
    loaded, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from", mesh)
  tok, tok_dir = stage_io.load_tokenizer_for(config, model_tok_dir, setup.data_tokenizer_dir, cfg)

  # The data, the optimizer and the train state.
  kind = _kind(stage)
  train_source = stage_io.load_split(setup.tfds_dir, kind, config.data.train_split, "train_split")
  eval_source = stage_io.load_split(setup.tfds_dir, kind, config.data.eval_split, "eval_split")
  num_steps = config.num_steps or estimate_steps(config, train_source, tok, kind)
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps)
  shardings = optim.state_shardings(cfg, "lm", tx, mesh)
  params = (optim.random_params(cfg, "lm", shardings["params"], config.seed) if loaded is None
            else loaded)
  state = optim.create_state(params, tx, shardings)
  del params, loaded

  # Validation (and model selection by the reward model).
  eval_set = EvalSet(process_batches(config, kind, eval_source, tok, mesh, config.eval_batch_size,
                                     "eval_batch_size", train=False),
                     mesh, config.eval_batch_size, TRAIN_KEYS, config.eval_batches, tok.pad_id)
  selector = None
  if config.select_by_rm.rm_path:
    selector = RewardSelector(config, cfg, mesh, tok, setup.tfds_dir)

  # The one loop: the step, its batches and the evaluation.
  task = loop.Task(
      name=stage,
      step=TrainStep(make_loss_fn(cfg), tx, schedule, config.grad_accum_steps, mesh,
                     config.batch_size),
      train_batches=lambda: loop.KeyedBatches(process_batches(
          config, kind, train_source, tok, mesh, config.batch_size, "batch_size", train=True),
          TRAIN_KEYS),
      rng=jax.random.key(config.seed + 1), record=loop.config_record(config), config=config,
      evaluate=make_evaluate(cfg, eval_set, shardings["params"], mesh, selector))
  task.check_memory = plan_compile.train_memory_check(
      task.step, stage, plan_compile.sft_batch(config.batch_size, config.seq_len, mesh), mesh)
  print(f"{stage}: {cfg.flavour} {cfg.num_layers}x{cfg.d_model}, {num_steps} steps of "
        f"{config.batch_size}x{config.seq_len} tokens, mesh {dict(mesh.shape)}, init "
        f"{init_from or 'random'}; writing {setup.stage_dir}", flush=True)
  state, last_eval, history = loop.run_loop(
      task, state, loop.Cadence.from_config(config, num_steps), setup.workdir, mesh,
      on_eval=selector.observe if selector else None)
  return _save(config, setup, stage, num_steps, state["params"], tok_dir, last_eval, history,
               selector)


def _save(config, setup, stage, num_steps, params, tok_dir, last_eval, history, selector):
  """The final model (the selector's best weights when it has some) and what the stage did."""
  meta = {"stage": stage, "steps": num_steps, "init_from": setup.init_from or None,
          "final_eval": last_eval,
          "first_eval": next((m for kind_, _, m in history if kind_ == "eval"), None)}
  if selector and selector.best is not None:
    params = selector.best_params
    meta["selected_by_rm"] = {"step": selector.best_step, "reward": selector.best,
                              "rm_path": config.select_by_rm.rm_path}
    print(f"{stage}: keeping the weights of step {selector.best_step} (validation reward "
          f"{selector.best:.4f})", flush=True)
  path = stage_io.save_final(setup.stage_dir, setup.cfg, params, "lm", tok_dir, meta)
  print(f"{stage}: final model written to {path}", flush=True)
  return path


class RewardSelector:
  """Model selection by validation reward-model score (greedy answers to validation prompts).

  The reward model is sharded on the mesh like the policy; every process holds the same prompts
  and the mesh splits their rows (`rollout.sample_batch`); the best weights are kept as a copy
  on the devices with the policy's own shardings, never gathered to a host.
  """

  def __init__(self, config, cfg, mesh, tok, tfds_dir):
    sel = config.select_by_rm
    check_positive(config, "select_by_rm.num_prompts", kind=int)
    check_positive(config, "select_by_rm.max_new_tokens", kind=int)
    rollout.batch_size_check(sel.num_prompts, mesh, "select_by_rm.num_prompts")
    self.rm_cfg, self.rm_params = stage_io.load_scalar_model(sel.rm_path, cfg,
                                                             "select_by_rm.rm_path", mesh)
    self.cfg, self.mesh, self.tok = cfg, mesh, tok
    self.max_new, self.num_prompts = sel.max_new_tokens, sel.num_prompts
    prompt_len = min(config.seq_len // 2, cfg.max_len - self.max_new)
    source = stage_io.load_split(tfds_dir, "prompts", config.data.eval_split, "eval_split")
    self.batch = next(iter(loaders.prompt_loader(source, tok, batch_size=sel.num_prompts,
                                                 prompt_len=prompt_len, num_epochs=1,
                                                 shuffle=False, drop_remainder=False,
                                                 shard=(0, 1))))
    self.valid = self.batch["index"] >= 0
    self.reward = rollout.JittedOnMesh(rollout.make_reward_fn(self.rm_cfg), mesh)
    self.best, self.best_step, self.best_params = None, None, None

  def score(self, params):
    sc = SamplingConfig(max_new_tokens=self.max_new, greedy=True, eos_token_id=self.tok.eos_id,
                        pad_token_id=self.tok.pad_id)
    out = rollout.sample_batch(params, self.cfg, self.batch, self.mesh, self.num_prompts,
                               jax.random.key(0), sc, 1)
    rewards = self.reward(self.rm_params, rollout.sequences(self.batch["tokens"],
                                                            self.batch["segment_ids"], out, 1))
    return {"rm_reward": float(rewards[self.valid].mean()),
            "response_length": float(out["lengths"][self.valid].mean())}

  def observe(self, step, params, metrics):
    reward = metrics.get("rm_reward")
    if reward is not None and (self.best is None or reward > self.best):
      self.best, self.best_step = reward, step
      self.best_params = jax.tree.map(jnp.copy, params)   # the step donates `params`
