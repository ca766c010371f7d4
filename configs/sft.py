r"""SFT (and offline base-model pretraining) config: `--config=configs/sft.py:<preset>`.

  python -m rlhf_jax.main --config=configs/sft.py:tiny --config.stage=pretrain   # base model
  python -m rlhf_jax.main --config=configs/sft.py:tiny                           # SFT from it
  python -m rlhf_jax.main --config=configs/sft.py:smollm2                        # SFT SmolLM2-135M

Presets: tiny (offline default), smollm2, 1.3b, 6.7b, 175b (InstructGPT, appendix C.1: 16 epochs,
cosine decay to 10%, residual dropout 0.2, batch 32 (8 at 175B), lr 9.65e-6 (5.03e-6 at 175B)).
Any field can be overridden on the command line, e.g. --config.model.num_layers=4.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import models  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(preset="tiny"):
  c = models.base_config(preset, "sft")
  # Model selection by validation reward-model score: a reward model directory ('' = off).
  c.select_by_rm = models.ml_collections.ConfigDict(
      {"rm_path": "", "num_prompts": 64, "max_new_tokens": 32})
  if preset == "tiny":
    c.model.dropout_resid = 0.0      # a 2 x 64 model trained for minutes under-fits; no dropout
    c.optimizer.lr = 3e-3
    c.batch_size, c.seq_len, c.num_steps = 16, 128, 1000
    c.eval_every, c.log_every = 250, 50
  elif preset == "smollm2":
    c.init_from = "smollm2-135m"
    c.model.dropout_resid = 0.2
    c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.weight_decay = 2e-5, 20, 0.0
    c.batch_size, c.eval_batch_size, c.seq_len, c.num_steps = 16, 16, 256, 0
    c.num_epochs = 2.0
  else:  # the paper's sizes
    c.model.dropout_resid = 0.2
    c.optimizer.lr = 5.03e-6 if preset == "175b" else 9.65e-6
    c.optimizer.warmup_steps, c.optimizer.weight_decay = 0, 0.0
    c.batch_size = c.eval_batch_size = 8 if preset == "175b" else 32
    c.seq_len, c.num_steps, c.num_epochs = 2048, 0, 16.0
    c.eval_every, c.checkpoint_every = 200, 200
  return c
