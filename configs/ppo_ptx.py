r"""PPO-ptx config: `--config=configs/ppo_ptx.py:<preset>`.

  python -m rlhf_jax.main --config=configs/ppo_ptx.py                         # offline default
  python -m rlhf_jax.main --config=configs/ppo_ptx.py --config.ppo.ptx_coef=0 # plain PPO

The policy and the frozen reference start from `init_from` ('auto' = <workdir>/sft/model), the value
function from `value_from` and the reward from `reward_model` ('auto' = <workdir>/rm/model).

InstructGPT (Ouyang et al. 2022, appendix C.3) and where each number lives:
  per-token KL reward coefficient beta 0.02 ............ ppo.kl_coef (fixed; adaptive_kl = Ziegler)
  pretraining loss coefficient gamma 27.8 .............. ppo.ptx_coef (0 = plain PPO)
  8x as many pretraining sequences as RL episodes ...... ppo.ptx_per_episode
  batch 512 episodes, minibatch 64 ...................... ppo.batch_size, ppo.minibatches (= 8)
  one PPO epoch per batch ................................ ppo.epochs
  no discount (gamma 1), GAE lambda 0.95 ................ ppo.gamma, ppo.lam
  clip ratio 0.2 ........................................ ppo.clip_eps, ppo.value_clip_eps
  policy EMA decay 0.992 ................................ ppo.ema_decay
  rollouts at temperature 1 ............................. ppo.temperature
  value function initialised from the reward model ..... value_from
  256k episodes ......................................... ppo.num_iterations x ppo.batch_size
The tiny preset shrinks the batch and the coefficients to the offline task's scale (a 2 x 64 model
for minutes on a CPU); see its comments.
"""
import ml_collections

from rlhf_jax import config_files

models = config_files.sibling(__file__, "models")
collect_config = config_files.sibling(__file__, "collect")
dpo_config = config_files.sibling(__file__, "dpo")
eval_config = config_files.sibling(__file__, "eval")
rm_config = config_files.sibling(__file__, "rm")
sft_config = config_files.sibling(__file__, "sft")


def ppo_fields():
  return ml_collections.ConfigDict({
      "num_iterations": 100,
      "batch_size": 512,          # episodes per iteration
      "minibatches": 8,           # 512 / 8 = 64 episodes per update
      "epochs": 1,
      "prompt_len": 256,
      "response_len": 256,
      "temperature": 1.0,
      # The learning rates of the policy's and the value function's AdamW; the other optimizer
      # settings are config.optimizer's (whose lr PPO does not use).
      "policy_lr": 9.65e-6,
      "value_lr": 9.65e-6,
      "clip_eps": 0.2,
      "value_clip_eps": 0.2,
      "vf_coef": 1.0,
      "gamma": 1.0,
      "lam": 0.95,
      "kl_coef": 0.02,
      "adaptive_kl": False,
      "kl_target": 6.0,           # nats per episode (adaptive_kl)
      "kl_horizon": 10000.0,      # episodes (adaptive_kl)
      "whiten_rewards": False,
      "missing_eos_penalty": 0.0,  # subtracted from the score of a response without EOS
      # reward_model='gold' (the oracle run): reward = scale x gold; 0 = normalised like the RM,
      # (gold - mean) / std over the SFT samples the collect stage ranked.
      "gold_reward_scale": 0.0,
      "ptx_coef": 27.8,
      "ptx_per_episode": 8,
      "ptx_seq_len": 2048,
      "ema_decay": 0.992,         # 0 = off
      # Memory, not the algorithm (same update, exactly accumulated): the rollout is sampled and
      # scored in rollout_micro_batches chunks, each minibatch's pretraining rows go through the
      # forward/backward in ptx_micro_batches chunks.
      "rollout_micro_batches": 1,
      "ptx_micro_batches": 1,
      # The frozen reference policy and reward model stored in 'bfloat16' (half the memory; the
      # compute dtype is config.model.dtype) or 'float32'.
      "frozen_dtype": "float32",
      # Decoding at scale (the sampled tokens only; PPO's log-probs come from the float32
      # training weights): the policy's weights for the rollout in 'bfloat16' or 'float32', in
      # the layout they were trained in ('train': FSDP shards gathered as used), resharded once
      # per rollout into the decode layout ('decode': tensor-parallel, replicated over data and
      # fsdp), or 'auto': 'decode' where that copy takes at most a quarter of device memory.
      "rollout_dtype": "float32",
      "rollout_layout": "train",
      "log_every": 1,
      "checkpoint_every": 10,
      "keep_checkpoints": 2,
  })


def get_config(preset="tiny"):
  """PPO-ptx and, for the pipeline (rlhf_jax.pipeline), the config of every earlier stage.

  The top level is the PPO stage's: what every stage has (model, mesh, init_from, data,
  optimizer, seeds, max_nonfinite_steps; no batch or loop fields: those are `ppo`), and the
  pipeline's switches and sub-configs.
  """
  c = models.base_config(preset, "ppo")
  # The pipeline: True runs every missing earlier stage first, then evaluates; False runs PPO only.
  c.pipeline = True
  c.pretrain_base = preset == "tiny"      # offline: pretrain the base model on the task's text
  c.collect_comparisons = preset in ("tiny", "smollm2")   # RM data = ranked SFT samples
  c.pretrain = sft_config.get_config(preset)
  c.pretrain.stage = "pretrain"
  if preset == "tiny":
    c.pretrain.num_steps = 400
  c.sft = sft_config.get_config(preset)
  c.collect = collect_config.get_config(preset)
  c.rm = rm_config.get_config(preset)
  c.eval = eval_config.get_config(preset)
  c.model.dropout_resid = 0.0
  c.model.dropout_attn = 0.0
  c.reward_model = "auto"    # 'gold': PPO against the offline task's gold labeler (oracle)
  # The pipeline also runs PPO-ptx against the gold labeler itself (stage ppo_oracle): the upper
  # bound of what PPO can do on the task with this policy, next to PPO against the reward model.
  c.oracle_run = preset == "tiny"
  # The pipeline also trains DPO (stage dpo, configs/dpo.py) on the reward model's comparisons
  # from the same SFT model, the baseline every reader asks for next to PPO-ptx.
  c.dpo_run = True
  c.dpo = dpo_config.get_config(preset)
  c.value_from = "auto"
  c.ppo = ppo_fields()
  p = c.ppo
  if preset == "tiny":
    c.optimizer.warmup_steps = 0
    c.optimizer.final_lr_fraction = 1.0
    p.num_iterations = 120
    p.batch_size = 64
    p.minibatches = 4
    p.prompt_len = 24       # offline prompts <= 20 tokens
    p.response_len = 16     # offline answers <= 8 tokens
    p.policy_lr = 1e-4
    p.value_lr = 1e-3
    # beta 0.2 keeps the policy within ~2 nats of SFT in 120 iterations; 0.1 went to 3.3 nats for
    # the same gold score on the training prompts.
    p.kl_coef = 0.2
    # SFT wipes out the tiny model's language modelling (held-out pretraining loss 0.9 -> 9); 0.02
    # brings it back to ~2.7 at a small cost in reward (0.05 and 0.1 cost more: 0.71, 0.69 win).
    p.ptx_coef = 0.02
    p.ptx_per_episode = 1
    p.ptx_seq_len = 64
    p.missing_eos_penalty = 1.0
    p.ema_decay = 0.0
    p.checkpoint_every = 10
  elif preset == "smollm2":
    c.model.remat = "full"
    p.num_iterations = 20
    p.batch_size = 16
    p.minibatches = 2
    p.prompt_len = 48
    p.response_len = 32
    p.policy_lr = 2e-6
    p.value_lr = 5e-6
    p.ptx_per_episode = 1
    p.ptx_seq_len = 128
    p.ema_decay = 0.0
  else:  # the paper's sizes
    c.optimizer.weight_decay = 0.0
    p.num_iterations = 500      # 256k episodes / 512
    p.frozen_dtype = "bfloat16"
    # 512 pretraining rows of 2048 tokens per minibatch in 8 chunks of 64 (python -m rlhf_jax.plan
    # --topology=... shows what one chip needs with and without).
    p.ptx_micro_batches = 8
    p.rollout_dtype = "bfloat16"
    p.rollout_layout = "auto"
  return c
