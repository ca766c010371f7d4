r"""SFT (and offline base-model pretraining) config: `--config=configs/sft.py:<preset>`.

  python -m rlhf_jax.main --config=configs/sft.py:tiny --config.stage=pretrain   # base model
  python -m rlhf_jax.main --config=configs/sft.py:tiny                           # SFT from it
  python -m rlhf_jax.main --config=configs/sft.py:smollm2                        # SFT SmolLM2-135M

Presets: tiny (offline default), smollm2, 1.3b, 6.7b, 175b (InstructGPT, appendix C.1: 16 epochs,
cosine decay to 10%, residual dropout 0.2, batch 32 (8 at 175B), lr 9.65e-6 (5.03e-6 at 175B)).
Any field can be overridden on the command line, e.g. --config.model.num_layers=4.
"""
import ml_collections

from rlhf_jax import config_files

models = config_files.sibling(__file__, "models")


def get_config(preset="tiny"):
  c = models.base_config(preset, "sft")
  # Model selection by validation reward-model score.
  c.select_by_rm = ml_collections.ConfigDict()
  c.select_by_rm.rm_path = ""            # a reward model directory ('' = off)
  c.select_by_rm.num_prompts = 64
  c.select_by_rm.max_new_tokens = 32
  if preset == "tiny":
    c.model.dropout_resid = 0.0      # a 2 x 64 model trained for minutes under-fits; no dropout
    c.optimizer.lr = 3e-3
    c.batch_size = 16
    c.seq_len = 128
    c.num_steps = 1000
    c.eval_every = 250
    c.log_every = 50
  elif preset == "smollm2":
    c.init_from = "smollm2-135m"
    c.model.dropout_resid = 0.2
    c.optimizer.lr = 2e-5
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.batch_size = 16
    c.eval_batch_size = 16
    c.seq_len = 256
    c.num_steps = 0
    c.num_epochs = 2.0
  else:  # the paper's sizes
    c.model.dropout_resid = 0.2
    c.optimizer.lr = 5.03e-6 if preset == "175b" else 9.65e-6
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.batch_size = 8 if preset == "175b" else 32
    c.eval_batch_size = 8 if preset == "175b" else 32
    c.seq_len = 2048
    c.num_steps = 0
    c.num_epochs = 16.0
    c.eval_every = 200
    c.checkpoint_every = 200
  return c
