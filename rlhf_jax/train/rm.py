"""Stage 2: the reward model, trained on K-way rankings with the paper's C(K, 2) loss.

Initialised from the SFT model with the LM head replaced by a scalar head
(`rlhf_jax.models.with_scalar_head`). A batch holds B prompts with K_max responses each
(`comparison_loader`: (B, K_max, T)); the step reshapes it to (B * K_max, T), forwards EVERY
RESPONSE ONCE, reads the reward at each response's last token (`last_index`: its eos), reshapes
to (B, K_max) and applies `losses.ranking_loss` over all pairs of different rank of each prompt.
All C(K, 2) comparisons of a prompt are one batch element: K forwards instead of the K(K-1)
forwards of a chosen/rejected pair loader, and no prompt is seen once per pair (over-fitting).

Evaluation (held-out comparisons): ranking loss, pairwise accuracy against the labels, the same
accuracy of the "longer response is better" baseline, and on the offline task accuracy against
the gold labeler (pairs with different gold scores) for both.

After training the reward is normalised (InstructGPT): with m the mean reward of SFT
demonstrations (prompt + response, `norm_examples` of the train split) and s the standard
deviation of the rewards of the compared responses (`norm_examples` train comparisons: with the
collect stage, samples of the SFT policy, what PPO scores), the scalar head is rescaled to output
(r - m) / s. The saved reward model thus scores demonstrations at mean 0 and SFT samples with unit
spread for every consumer (PPO, evaluation), so the KL coefficient means the same from run to run;
m and 1/s are recorded in `<model>/rlhf_jax_stage.json` (`reward_bias`, `reward_gain`).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import distributed
from rlhf_jax import losses
from rlhf_jax import plan_compile
from rlhf_jax import rollout
from rlhf_jax import sharding
from rlhf_jax.data import builders, gold_labeler, loaders, shards
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, abstract_params, with_scalar_head
from rlhf_jax.train import loop
from rlhf_jax.train import optim
from rlhf_jax.train import stage_io
from rlhf_jax.train.step import TrainStep, jit_eval_step

TRAIN_KEYS = ("tokens", "segment_ids", "positions", "last_index", "ranks", "response_valid")


def response_rewards(cfg: ModelConfig, params, batch, *, rng=None, train=False):
  """(B, K) rewards: all B*K responses in ONE forward, each read at its last token."""
  b, k, t = batch["tokens"].shape
  flat = {name: batch[name].reshape(b * k, t) for name in ("tokens", "segment_ids", "positions")
          if name in batch}
  return rollout.scores_at(cfg, params, flat, batch["last_index"].reshape(b * k), rng=rng,
                           train=train).reshape(b, k)


def make_loss_fn(cfg: ModelConfig):
  """(params, batch, rng) -> (sum of per-prompt losses, prompts, {correct_sum, pairs_sum})."""
  def loss_fn(params, batch, rng):
    rewards = response_rewards(cfg, params, batch, rng=rng, train=True)
    loss_sum, count = losses.ranking_loss(rewards, batch["ranks"], batch["response_valid"])
    correct, pairs = losses.ranking_accuracy(rewards, batch["ranks"], batch["response_valid"])
    return loss_sum, count, {"correct_sum": correct, "pairs_sum": pairs}
  return loss_fn


def make_eval_fn(cfg: ModelConfig):
  def eval_fn(params, batch):
    rewards = response_rewards(cfg, params, batch)
    loss_sum, count = losses.ranking_loss(rewards, batch["ranks"], batch["response_valid"])
    return loss_sum, count, rewards
  return eval_fn


def summarize(values):
  """The logged training metrics: accuracy from the summed correct / pairs counts."""
  out = dict(values)
  out["accuracy"] = out.pop("correct_sum") / max(out.pop("pairs_sum"), 1.0)
  out.pop("count", None)
  return out


def pair_accuracy(scores, ranks, valid):
  """Numpy pairwise accuracy of `scores` (N, K) against preferences `ranks` (lower = better;
  equal ranks are not compared), a score tie counting half. Returns (correct, pairs)."""
  scores, ranks = np.asarray(scores, np.float64), np.asarray(ranks, np.float64)
  valid = np.asarray(valid) > 0
  pairs = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  margin = scores[:, :, None] - scores[:, None, :]
  hit = (margin > 0) + 0.5 * (margin == 0)
  return float((pairs * hit).sum()), float(pairs.sum())


def check_comparisons(batch):
  """Every real prompt of a batch needs K >= 2 responses (the ranking loss compares pairs)."""
  k = np.asarray(batch["response_valid"]).sum(axis=1)
  index = np.asarray(batch["index"]) if "index" in batch else np.zeros(len(k), np.int32)
  bad = np.nonzero((index >= 0) & (k < 2))[0]
  if len(bad):
    raise UserError(f"comparisons record {int(index[bad[0]])}: has K = {int(k[bad[0]])} "
                    "response(s); the ranking loss needs K >= 2 per prompt")


def gold_matrix(source, index, k_max):
  """(N, K_max) gold scores of the offline task for the records `index` (NaN on padding)."""
  out = np.full((len(index), k_max), np.nan)
  for row, i in enumerate(index):
    if i < 0:
      continue
    record = source[int(i)]
    prompt = loaders.text_of(record["prompt"])
    for j, response in enumerate(record["responses"]):
      out[row, j] = gold_labeler.gold_score(prompt, loaders.text_of(response))
  return out


class RmEval:
  """Held-out reward-model metrics over a comparisons split (host batches read once). The
  metrics cover the rows of every process: each keeps the labels of all rows (gathered once) and
  the rewards come back for all rows."""

  def __init__(self, loader, source, mesh, batch_size, max_batches, gold, pad_id=0,
               keys=TRAIN_KEYS, make_eval=None):
    self.mesh, self.batch_size = mesh, batch_size
    # make_eval(cfg) -> eval_fn(params, batch) -> (loss_sum, count, (B, K) scores); DPO passes
    # its own (implicit rewards), the RM's is make_eval_fn.
    self.make_eval = make_eval or make_eval_fn
    self.batches, self.info = [], []
    for i, batch in enumerate(shards.lockstep(loader, pad_id, "the validation comparisons")):
      if max_batches and i >= max_batches:
        break
      check_comparisons(batch)
      self.batches.append({k: batch[k] for k in keys})
      info = {k: distributed.gather_rows(batch[k])
              for k in ("ranks", "response_valid", "lengths", "index")}
      if gold:
        info["gold"] = gold_matrix(source, info["index"], info["ranks"].shape[1])
      self.info.append(info)
    if not self.batches:
      raise UserError("config.data.eval_split: the validation comparisons gave no batch")
    self.step = None

  def __call__(self, cfg, params, param_shardings):
    total, count, rewards = 0.0, 0.0, []
    for local in self.batches:
      if self.step is None:
        self.step = jit_eval_step(self.make_eval(cfg), param_shardings, local, self.mesh)
      s, c, r = jax.device_get(self.step(params, sharding.global_batch(local, self.mesh,
                                                                 self.batch_size)))
      total, count = total + float(s), count + float(c)
      rewards.append(np.asarray(r))
    return self.metrics(total, count, np.concatenate(rewards))

  def metrics(self, total, count, rewards):
    info = {k: np.concatenate([b[k] for b in self.info]) for k in self.info[0]}
    valid = info["response_valid"] * (info["index"] >= 0)[:, None]
    out = {"loss": total / max(count, 1.0), "prompts": count}
    acc = pair_accuracy(rewards, info["ranks"], valid)
    out["accuracy"] = acc[0] / max(acc[1], 1.0)
    length = pair_accuracy(info["lengths"], info["ranks"], valid)
    out["length_accuracy"] = length[0] / max(length[1], 1.0)
    if "gold" in info:
      gold_valid = valid * ~np.isnan(info["gold"])
      gold_rank = -np.nan_to_num(info["gold"])
      g = pair_accuracy(rewards, gold_rank, gold_valid)
      gl = pair_accuracy(info["lengths"], gold_rank, gold_valid)
      out["gold_accuracy"] = g[0] / max(g[1], 1.0)
      out["length_gold_accuracy"] = gl[0] / max(gl[1], 1.0)
      # How often the labels themselves agree with the gold labeler (the noise ceiling).
      lab = pair_accuracy(-info["ranks"].astype(np.float64), gold_rank, gold_valid)
      out["label_gold_accuracy"] = lab[0] / max(lab[1], 1.0)
    out["pairs"] = acc[1]
    return out


def _scored(loader, score, params, mesh, batch_size, keep=("index",), pad_id=0):
  """Yields ({key: rows of every process} for `keep`, `score(params, batch)` of every row) over
  the batches of `loader` (this process's rows; every process steps through as many batches,
  `shards.lockstep`), with one jitted `score` for all batches."""
  step = None
  for batch in shards.lockstep(loader, pad_id, "the normalisation data"):
    keys = {k: batch[k] for k in ("tokens", "segment_ids", "positions", "last_index")}
    if step is None:
      step = jit_eval_step(score, jax.tree.map(lambda x: x.sharding, params), keys, mesh)
    with sharding.activate(mesh):
      out = step(params, sharding.global_batch(keys, mesh, batch_size))
    yield ({k: distributed.gather_rows(batch[k]) for k in keep},
           np.asarray(jax.device_get(out)))


def _first(batch, done, limit):
  """Which rows of `batch` are among the first `limit` real records, `done` already taken."""
  real = batch["index"] >= 0
  return real & (np.cumsum(real) + done <= limit)


def demonstration_reward_mean(cfg, params, source, tok, mesh, config):
  """Mean reward at the last token of the first `norm_examples` demonstrations."""
  bs = config.eval_batch_size
  loader = shards.ShardedBatches(
      lambda shard, rows: loaders.sft_loader(
          source, tok, batch_size=rows, seq_len=config.seq_len, num_epochs=1, shuffle=False,
          pack=False, drop_remainder=False, shard=shard),
      stage_io.local_batch_size(mesh, bs), config.data.get("shards", 0), tok.pad_id,
      "eval_batch_size")

  def score(params, batch):
    return rollout.scores_at(cfg, params, batch, batch["last_index"])

  total, n = 0.0, 0
  for batch, r in _scored(loader, score, params, mesh, bs, pad_id=tok.pad_id):
    take = _first(batch, n, config.norm_examples)
    total += float(r[take].sum())
    n += int(take.sum())
    if n >= config.norm_examples:
      break
  if n == 0:
    raise UserError("config.data.norm_split: no demonstrations to fit the reward bias on")
  return total / n, n


def sample_reward_std(cfg, params, source, tok, mesh, config, k_max):
  """Standard deviation of the reward over the responses of the first `norm_examples` comparison
  records (with the collect stage: samples of the SFT policy, what PPO will score)."""
  bs = config.eval_batch_size
  loader = shards.ShardedBatches(
      lambda shard, rows: loaders.comparison_loader(
          source, tok, batch_size=rows, seq_len=config.seq_len, k_max=k_max, num_epochs=1,
          shuffle=False, drop_remainder=False, shard=shard),
      stage_io.local_batch_size(mesh, bs), config.data.get("shards", 0), tok.pad_id,
      "eval_batch_size")
  values, prompts = [], 0
  for batch, r in _scored(loader, lambda p, b: response_rewards(cfg, p, b), params, mesh, bs,
                          keep=("index", "response_valid"), pad_id=tok.pad_id):
    take = _first(batch, prompts, config.norm_examples)
    values.append(r[take][batch["response_valid"][take] > 0])
    prompts += int(take.sum())
    if prompts >= config.norm_examples:
      break
  values = np.concatenate(values) if values else np.zeros(0)
  if len(values) < 2:
    raise UserError("config.norm_examples: fewer than two compared responses to fit the reward "
                    "gain on")
  return float(values.std()), len(values)


def normalized_head(params, mean, gain):
  """Params whose scalar head outputs gain * (r - mean): kernel * gain, (bias - mean) * gain."""
  params = dict(params)
  head = dict(params["scalar_head"])
  head["kernel"] = head["kernel"] * jnp.asarray(gain, head["kernel"].dtype)
  head["bias"] = (head["bias"] - jnp.asarray(mean, head["bias"].dtype)) * jnp.asarray(
      gain, head["bias"].dtype)
  params["scalar_head"] = head
  return params


def comparison_batches(config, source, tok, mesh, k_max, *, train):
  """This process's rows of the global comparison batches (B, K_max, seq_len): for training
  `batch_size` prompts, shuffled by `data_seed`, endless; else `eval_batch_size` prompts, one pass
  in order with the last batch padded. Shared by the RM and DPO stages."""
  if train:
    size, field = config.batch_size, "batch_size"
    kwargs = {"seed": config.data_seed, "prefetch": config.data.prefetch}
  else:
    size, field = config.eval_batch_size, "eval_batch_size"
    kwargs = {"num_epochs": 1, "shuffle": False, "drop_remainder": False}
  return shards.ShardedBatches(
      lambda shard, rows: loaders.comparison_loader(source, tok, batch_size=rows,
                                                    seq_len=config.seq_len, k_max=k_max,
                                                    shard=shard, **kwargs),
      stage_io.local_batch_size(mesh, size), config.data.get("shards", 0), tok.pad_id, field)


def k_max_of(config, tfds_dir):
  """config.k_max, or with 0 the largest K the comparisons dataset records."""
  if config.k_max:
    return config.k_max
  found = builders.prepared_builder(tfds_dir, "comparisons").info.metadata.get("max_k", {})
  wanted = [found.get(s) for s in (config.data.train_split, config.data.eval_split)]
  if not all(wanted):
    raise UserError("config.k_max: 0 (auto) but the comparisons dataset does not record its "
                    "largest K; set config.k_max")
  return int(max(wanted))


def comparisons_tfds_dir(config, workdir, tfds_dir):
  """The TFDS data_dir of the comparisons: the run's data (`config.data.comparisons_dir` ''), or
  `<comparisons_dir>/tfds` of another data dir, e.g. the collect stage's ('auto' means
  <workdir>/collect). The demonstrations of the normalisation stay in the run's data."""
  where = config.data.get("comparisons_dir", "")
  if not where:
    return tfds_dir
  if where == "auto":
    where = os.path.join(workdir, "collect")
  path = os.path.join(where, "tfds")
  if not os.path.isdir(path):
    raise UserError(f"config.data.comparisons_dir: {where} has no tfds/ folder (expected a data "
                    "dir with a comparisons dataset, e.g. <workdir>/collect from collect)")
  return path


def run(config, workdir):
  """Runs the reward-model stage in `<workdir>/rm`."""
  stage = "rm"
  setup = stage_io.begin_stage(config, workdir, stage, "sft")
  if setup is None:
    return stage_io.final_model_dir(workdir, stage)
  workdir, cfg, mesh, init_from = setup.workdir, setup.cfg, setup.mesh, setup.init_from
  if not init_from:
    raise UserError("config.init_from: the reward model starts from an SFT model; give its path")
  lm_params, model_tok_dir = stage_io.load_init_model(init_from, cfg, "config.init_from", mesh)
  head_sh = sharding.param_shardings(abstract_params(cfg, "scalar", boxed=True),
                                     mesh)["scalar_head"]
  params = with_scalar_head(lm_params, cfg, jax.random.key(config.seed), head_sh)
  del lm_params
  tok, tok_dir = stage_io.load_tokenizer_for(config, model_tok_dir, setup.data_tokenizer_dir, cfg)

  # The comparisons, the optimizer and the train state.
  comparisons_dir = comparisons_tfds_dir(config, workdir, setup.tfds_dir)
  train_source = stage_io.load_split(comparisons_dir, "comparisons", config.data.train_split,
                                     "train_split")
  eval_source = stage_io.load_split(comparisons_dir, "comparisons", config.data.eval_split,
                                    "eval_split")
  k_max = k_max_of(config, comparisons_dir)
  num_steps = config.num_steps or max(
      1, int(np.ceil(config.num_epochs * len(train_source) / config.batch_size)))
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps)
  shardings = optim.state_shardings(cfg, "scalar", tx, mesh)
  state = optim.create_state(params, tx, shardings)
  del params

  # The one loop: the step, its batches and the held-out evaluation.
  rm_eval = RmEval(comparison_batches(config, eval_source, tok, mesh, k_max, train=False),
                   eval_source, mesh, config.eval_batch_size, config.eval_batches,
                   gold=config.data.source == "offline", pad_id=tok.pad_id)

  def train_batches():
    return loop.KeyedBatches(comparison_batches(config, train_source, tok, mesh, k_max,
                                                train=True), TRAIN_KEYS, check=check_comparisons)

  task = loop.Task(
      name=stage,
      step=TrainStep(make_loss_fn(cfg), tx, schedule, config.grad_accum_steps, mesh,
                     config.batch_size),
      train_batches=train_batches, rng=jax.random.key(config.seed + 1),
      record=loop.config_record(config), config=config,
      evaluate=lambda p: rm_eval(cfg, p, shardings["params"]),
      reduce=lambda items: summarize(loop.mean_over_applied_steps(items)))
  task.check_memory = plan_compile.train_memory_check(
      task.step, stage, plan_compile.rm_batch(config.batch_size, k_max, config.seq_len, mesh), mesh)
  print(f"{stage}: {cfg.flavour} {cfg.num_layers}x{cfg.d_model} + scalar head from {init_from}, "
        f"{num_steps} steps of {config.batch_size} prompts x K<={k_max} x {config.seq_len} "
        f"tokens, mesh {dict(mesh.shape)}; writing {setup.stage_dir}", flush=True)
  state, last_eval, history = loop.run_loop(
      task, state, loop.Cadence.from_config(config, num_steps), workdir, mesh)
  meta = {"stage": stage, "steps": num_steps, "init_from": init_from, "k_max": k_max,
          "comparisons": comparisons_dir,
          "final_eval": last_eval,
          "first_eval": next((m for kind, _, m in history if kind == "eval"), None)}
  return _normalize_and_save(config, setup, state["params"], tok, tok_dir, train_source, k_max,
                             meta)


def _normalize_and_save(config, setup, params, tok, tok_dir, train_source, k_max, meta):
  """Folds the reward normalisation into the scalar head (`norm_examples` > 0) and writes the
  final model with what the stage did."""
  stage, cfg, mesh = "rm", setup.cfg, setup.mesh
  if config.norm_examples:
    sft_source = stage_io.load_split(setup.tfds_dir, "sft", config.data.norm_split, "norm_split")
    mean, n = demonstration_reward_mean(cfg, params, sft_source, tok, mesh, config)
    std, n_samples = sample_reward_std(cfg, params, train_source, tok, mesh, config, k_max)
    gain = 1.0 / max(std, 1e-6)
    params = normalized_head(params, mean, gain)
    after, _ = demonstration_reward_mean(cfg, params, sft_source, tok, mesh, config)
    std_after, _ = sample_reward_std(cfg, params, train_source, tok, mesh, config, k_max)
    meta.update(reward_bias=-mean * gain, reward_gain=gain, demonstrations_mean_before=mean,
                demonstrations_mean_after=after, norm_examples=n, sample_std_before=std,
                sample_std_after=std_after, norm_samples=n_samples)
    print(f"{stage}: {n} demonstrations scored mean {mean:.4f}, {n_samples} compared responses "
          f"std {std:.4f}; reward = {gain:.4f} x (score - {mean:.4f}) folded into the scalar head "
          f"(demonstrations mean now {after:.2e}, sample std {std_after:.4f})", flush=True)
  path = stage_io.save_final(setup.stage_dir, cfg, params, "scalar", tok_dir, meta)
  print(f"{stage}: final model written to {path}", flush=True)
  return path
