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

from rlhf_jax import losses
from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.data import encoding, loaders
from rlhf_jax.errors import UserError, check_positive
from rlhf_jax.models import ModelConfig
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.train import loop
from rlhf_jax.train import optim
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import TrainStep, forward, jit_eval_step

TRAIN_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


def make_loss_fn(cfg: ModelConfig):
  """(params, batch, rng) -> (token loss sum, target count, {}): the masked next-token loss."""
  def loss_fn(params, batch, rng):
    logits = forward(cfg, "lm", params, batch, rng=rng, train=True)
    loss_sum, count = losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])
    return loss_sum, count, {}
  return loss_fn


def make_eval_fn(cfg: ModelConfig):
  def eval_fn(params, batch):
    logits = forward(cfg, "lm", params, batch)
    return losses.lm_loss(logits, batch["tokens"], batch["loss_mask"])
  return eval_fn


def _kind(stage):
  return "ptx" if stage == "pretrain" else "sft"


def _loader(kind, source, tok, batch_size, seq_len, *, seed, train, prefetch=0):
  if kind == "ptx":
    return loaders.ptx_loader(source, tok, batch_size=batch_size, seq_len=seq_len, seed=seed,
                              num_epochs=None if train else 1, shuffle=train, prefetch=prefetch)
  if train:
    return loaders.sft_loader(source, tok, batch_size=batch_size, seq_len=seq_len, seed=seed,
                              prefetch=prefetch)
  # Validation: one demonstration per row and every record exactly once.
  return loaders.sft_loader(source, tok, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            num_epochs=1, shuffle=False, pack=False, drop_remainder=False)


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
  """Host batches of a validation split, read once and reused at every evaluation."""

  def __init__(self, loader, mesh, batch_size, keys, max_batches):
    self.mesh, self.batch_size = mesh, batch_size
    self.batches = []
    for i, batch in enumerate(loader):
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
    loaded, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from")
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
  local_eval_bs = stage_io.local_batch_size(mesh, config.eval_batch_size)
  eval_set = EvalSet(_loader(kind, eval_source, tok, local_eval_bs, config.seq_len,
                             seed=config.data_seed, train=False),
                     mesh, config.eval_batch_size, TRAIN_KEYS, config.eval_batches)
  selector = None
  if config.select_by_rm.rm_path:
    selector = RewardSelector(config, cfg, mesh, tok, setup.tfds_dir)

  # The one loop: the step, its batches and the evaluation.
  local_bs = stage_io.local_batch_size(mesh, config.batch_size)
  task = loop.Task(
      name=stage,
      step=TrainStep(make_loss_fn(cfg), tx, schedule, config.grad_accum_steps, mesh,
                     config.batch_size),
      train_batches=lambda: loop.KeyedBatches(iter(_loader(
          kind, train_source, tok, local_bs, config.seq_len, seed=config.data_seed, train=True,
          prefetch=config.data.prefetch)), TRAIN_KEYS),
      rng=jax.random.key(config.seed + 1), record=loop.config_record(config),
      evaluate=make_evaluate(cfg, eval_set, shardings["params"], mesh, selector))
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
  """Model selection by validation reward-model score (greedy answers to validation prompts)."""

  def __init__(self, config, cfg, mesh, tok, tfds_dir):
    sel = config.select_by_rm
    check_positive(config, "select_by_rm.num_prompts", kind=int)
    check_positive(config, "select_by_rm.max_new_tokens", kind=int)
    self.rm_cfg, rm_params = stage_io.load_scalar_model(sel.rm_path, cfg, "select_by_rm.rm_path")
    self.rm_params = jax.device_put(rm_params, sharding.replicated(mesh))
    self.cfg, self.mesh, self.tok = cfg, mesh, tok
    self.max_new = sel.max_new_tokens
    prompt_len = min(config.seq_len // 2, cfg.max_len - self.max_new)
    source = stage_io.load_split(tfds_dir, "prompts", config.data.eval_split, "eval_split")
    it = iter(loaders.prompt_loader(source, tok, batch_size=sel.num_prompts,
                                    prompt_len=prompt_len, num_epochs=1, shuffle=False,
                                    drop_remainder=False))
    batch = next(it)
    self.prompts = {k: jnp.asarray(batch[k]) for k in ("tokens", "segment_ids")}
    self.valid = batch["index"] >= 0
    self.best, self.best_step, self.best_params = None, None, None

  def score(self, params):
    sc = SamplingConfig(max_new_tokens=self.max_new, greedy=True, eos_token_id=self.tok.eos_id,
                        pad_token_id=self.tok.pad_id)
    out = sample(params, self.cfg, self.prompts["tokens"], self.prompts["segment_ids"],
                 jax.random.key(0), sc)
    tokens, seg = rollout.append_responses(self.prompts["tokens"], self.prompts["segment_ids"],
                                           out.tokens, out.mask)
    rewards = np.asarray(rollout.last_token_scores(self.rm_cfg, self.rm_params, tokens, seg,
                                                   self.prompts["tokens"].shape[1], out.lengths))
    return {"rm_reward": float(rewards[self.valid].mean()),
            "response_length": float(np.asarray(out.lengths)[self.valid].mean())}

  def observe(self, step, params, metrics):
    reward = metrics.get("rm_reward")
    if reward is not None and (self.best is None or reward > self.best):
      self.best, self.best_step = reward, step
      self.best_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
