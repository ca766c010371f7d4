"""Training stages: each stage's loss wiring in its own module, one train step and one loop.

  pretrain  `sft.run` with plain LM loss on pretraining text (the offline base model)
  sft       `sft.run`: supervised fine-tuning on demonstrations (prompt masked)
  rm        `rm.run`: reward model on K-way rankings (the C(K, 2) loss), normalised bias
  ppo       `ppo.run`: PPO / PPO-ptx / PPO against the gold labeler; each iteration is one call
            of the pure jitted function of `ppo_iteration.py` (rollout, scoring, updates)
  dpo       `dpo.run`: DPO on the reward model's comparisons, reference = SFT (a baseline)

What they share:
  step.py      the pure train step (forward, micro-batches, non-finite guard, jit)
  optim.py     AdamW + schedule, the sharded train state
  loop.py      the ONE loop: resume, checkpoints, metrics, evaluation, non-finite counter
  stage_io.py  config check, workdir and 'auto' paths, data, tokenizer, models, final save
"""
STAGE_NAMES = ("pretrain", "sft", "rm", "ppo", "dpo")
