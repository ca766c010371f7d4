"""Training stages: pure sharded train steps and the loop of each stage.

  pretrain  `sft.run` with plain LM loss on pretraining text (the offline base model)
  sft       `sft.run`: supervised fine-tuning on demonstrations (prompt masked)
  rm        `rm.run`: reward model on K-way rankings (the C(K, 2) loss), normalised bias
"""
STAGE_NAMES = ("pretrain", "sft", "rm", "ppo")
