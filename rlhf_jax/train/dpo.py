"""DPO (Rafailov et al. 2023): the policy trained directly on the reward model's comparisons.

A baseline next to PPO-ptx on the same data: the policy starts from the SFT model, the frozen
reference is the same SFT model, and the batches are the reward model's (`rm.comparison_batches`:
B prompts x K_max ranked responses x T tokens, all C(K, 2) pairs of a prompt one batch element).
The step forwards every response ONCE, sums its log-probs over the response tokens (eos included;
`logprobs.next_token_logprobs`, chunked when `model.logits_chunk`) and applies `losses.dpo_loss`:

  loss_b = -1/C(K_b, 2) sum_{(w, l): rank_w < rank_l}
               log sigmoid(beta ((log pi_w - log ref_w) - (log pi_l - log ref_l)))

Reference log-probs are computed IN THE STEP, not precomputed: `DpoStep` runs a jitted forward of
the frozen SFT model on each batch before the train step (one extra forward, no backward, per
step) and hands the (B, K) result to the step as `ref_logp`, so shuffling, resume and any number
of passes need no stored table. The reference is held on the mesh with the policy's shardings.

Logged: loss, the implicit-reward accuracy (beta (log pi - log ref) ranks the pair like the
labels; a tie counts half, so 0.5 at the start) and the mean log-ratio log pi - log ref of the
responses. Held-out (`rm.RmEval` on the validation comparisons): the DPO loss, the implicit-reward
accuracy against the labels and, offline, against the gold labeler, next to the same numbers of
the "longer is better" baseline. The final policy is `<workdir>/dpo/model` (an LM), which the
evaluation compares with SFT and PPO under the gold labeler.
"""
import math

import jax
import jax.numpy as jnp

from rlhf_jax import logprobs
from rlhf_jax import losses
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig
from rlhf_jax.train import loop
from rlhf_jax.train import optim
from rlhf_jax.train import rm
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import TrainStep, split_micro_batches

TRAIN_KEYS = ("tokens", "segment_ids", "positions", "response_mask", "ranks", "response_valid")


def response_logprobs(cfg: ModelConfig, params, batch, *, rng=None, train=False):
  """(B, K) summed log-probs of every response of a (B, K, T) batch, all B*K rows in ONE forward."""
  b, k, t = batch["tokens"].shape
  flat = {name: batch[name].reshape(b * k, t) for name in ("tokens", "segment_ids", "positions")}
  logp, _ = logprobs.next_token_logprobs(cfg, params, flat, rng=rng, train=train)
  mask = batch["response_mask"].reshape(b * k, t)[:, 1:].astype(jnp.float32)
  return jnp.sum(logp * mask, axis=1).reshape(b, k)


def _terms(logp, ref_logp, batch, beta):
  """(loss_sum, count, {correct_sum, pairs_sum, logratio_sum, responses_sum}, implicit rewards)."""
  ranks, valid = batch["ranks"], batch["response_valid"]
  loss_sum, count = losses.dpo_loss(logp, ref_logp, ranks, valid, beta)
  rewards = losses.dpo_implicit_rewards(logp, ref_logp, beta)
  correct, pairs = losses.ranking_accuracy(rewards, ranks, valid)
  mask = (valid > 0).astype(jnp.float32)
  extra = {"correct_sum": correct, "pairs_sum": pairs,
           "logratio_sum": jnp.sum((logp - ref_logp) * mask), "responses_sum": jnp.sum(mask)}
  return loss_sum, count, extra, rewards


def make_loss_fn(cfg: ModelConfig, beta):
  """(params, batch with `ref_logp`, rng) -> (DPO loss sum, prompts, sums of the metrics)."""
  def loss_fn(params, batch, rng):
    logp = response_logprobs(cfg, params, batch, rng=rng, train=True)
    loss_sum, count, extra, _ = _terms(logp, batch["ref_logp"], batch, beta)
    return loss_sum, count, extra
  return loss_fn


def make_eval_fn(beta):
  """cfg -> eval_fn({'policy', 'ref'} params, batch) -> (loss sum, prompts, implicit rewards)."""
  def make(cfg):
    def eval_fn(params, batch):
      logp = response_logprobs(cfg, params["policy"], batch)
      ref_logp = response_logprobs(cfg, params["ref"], batch)
      loss_sum, count, _, rewards = _terms(logp, ref_logp, batch, beta)
      return loss_sum, count, rewards
    return eval_fn
  return make


def summarize(values):
  """The logged training metrics: accuracy and the mean log-ratio from their summed parts."""
  out = rm.summarize(values)
  out["logratio"] = out.pop("logratio_sum") / max(out.pop("responses_sum"), 1.0)
  return out


def reference_logprobs_fn(cfg, micro_batches, mesh):
  """(ref params, batch) -> (B, K) summed response log-probs of the frozen reference, in
  `micro_batches` slices (the train step's split, `lax.map`) so it needs no more memory than one
  micro-batch's forward."""
  def fn(params, batch):
    if micro_batches == 1:
      return response_logprobs(cfg, params, batch)
    micro = split_micro_batches(batch, micro_batches, mesh)
    out = jax.lax.map(lambda mb: response_logprobs(cfg, params, mb), micro)   # (A, B/A, K)
    return out.swapaxes(0, 1).reshape((-1,) + out.shape[2:])                 # rows back in order
  return fn


class DpoStep(TrainStep):
  """The loop's step: the frozen reference's log-probs of the batch (one jitted forward), then the
  one train step (`TrainStep`) on the batch with them as `ref_logp`."""

  def __init__(self, config, cfg, tx, schedule, mesh, ref_params):
    super().__init__(make_loss_fn(cfg, config.beta), tx, schedule, config.grad_accum_steps, mesh,
                     config.batch_size)
    self.ref_params, self._ref = ref_params, None
    self._ref_fn = reference_logprobs_fn(cfg, config.grad_accum_steps, mesh)

  def __call__(self, state, local, rng):
    batch = sharding.global_batch(local, self.mesh, self.batch_size)
    if self._ref is None:
      batch_sh = jax.tree.map(lambda x: x.sharding, batch)
      self._ref = jax.jit(self._ref_fn,
                          in_shardings=(jax.tree.map(lambda x: x.sharding, self.ref_params),
                                        batch_sh),
                          out_shardings=sharding.replicated(self.mesh))
    with sharding.activate(self.mesh):
      ref = jax.device_get(self._ref(self.ref_params, batch))
    rows = sharding.process_batch_rows(self.mesh, self.batch_size)
    return super().__call__(state, {**local, "ref_logp": ref[rows]}, rng)


def run(config, workdir):
  """Runs the DPO stage in `<workdir>/dpo`."""
  stage = "dpo"
  setup = stage_io.begin_stage(config, workdir, stage, "sft")
  if setup is None:
    return stage_io.final_model_dir(workdir, stage)
  cfg, mesh, init_from = setup.cfg, setup.mesh, setup.init_from
  if not init_from:
    raise UserError("config.init_from: DPO starts from an SFT model (also its reference); give "
                    "its path")
  params, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from", mesh)
  ref_params = jax.tree.map(jnp.copy, params)   # the step donates the policy's buffers
  tok, tok_dir = stage_io.load_tokenizer_for(config, model_tok_dir, setup.data_tokenizer_dir, cfg)

  # The comparisons (the reward model's), the optimizer and the train state.
  comparisons_dir = rm.comparisons_tfds_dir(config, setup.workdir, setup.tfds_dir)
  train_source = stage_io.load_split(comparisons_dir, "comparisons", config.data.train_split,
                                     "train_split")
  eval_source = stage_io.load_split(comparisons_dir, "comparisons", config.data.eval_split,
                                    "eval_split")
  k_max = rm.k_max_of(config, comparisons_dir)
  num_steps = config.num_steps or max(
      1, math.ceil(config.num_epochs * len(train_source) / config.batch_size))
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps)
  shardings = optim.state_shardings(cfg, "lm", tx, mesh)
  state = optim.create_state(params, tx, shardings)
  del params

  heldout = rm.RmEval(rm.comparison_batches(config, eval_source, tok, mesh, k_max, train=False),
                      eval_source, mesh, config.eval_batch_size, config.eval_batches,
                      gold=config.data.source == "offline", pad_id=tok.pad_id, keys=TRAIN_KEYS,
                      make_eval=make_eval_fn(config.beta))
  eval_sh = {"policy": shardings["params"], "ref": jax.tree.map(lambda x: x.sharding, ref_params)}
  task = loop.Task(
      name=stage, step=DpoStep(config, cfg, tx, schedule, mesh, ref_params),
      train_batches=lambda: loop.KeyedBatches(
          rm.comparison_batches(config, train_source, tok, mesh, k_max, train=True), TRAIN_KEYS,
          check=rm.check_comparisons),
      rng=jax.random.key(config.seed + 1), record=loop.config_record(config),
      evaluate=lambda p: heldout(cfg, {"policy": p, "ref": ref_params}, eval_sh),
      reduce=lambda items: summarize(loop.mean_over_applied_steps(items)))
  print(f"{stage}: {cfg.flavour} {cfg.num_layers}x{cfg.d_model} from {init_from} (also the "
        f"reference), beta {config.beta}, {num_steps} steps of {config.batch_size} prompts x "
        f"K<={k_max} x {config.seq_len} tokens, mesh {dict(mesh.shape)}; writing "
        f"{setup.stage_dir}", flush=True)
  state, last_eval, history = loop.run_loop(
      task, state, loop.Cadence.from_config(config, num_steps), setup.workdir, mesh)
  meta = {"stage": stage, "steps": num_steps, "init_from": init_from, "reference": init_from,
          "beta": config.beta, "k_max": k_max, "comparisons": comparisons_dir,
          "final_eval": last_eval,
          "first_eval": next((m for kind, _, m in history if kind == "eval"), None)}
  path = stage_io.save_final(setup.stage_dir, cfg, state["params"], "lm", tok_dir, meta)
  print(f"{stage}: final model written to {path}", flush=True)
  return path
