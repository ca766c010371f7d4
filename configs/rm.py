r"""Reward-model config: `--config=configs/rm.py:<preset>`.

  python -m rlhf_jax.main --config=configs/rm.py:tiny          # from <workdir>/sft/model

Presets as in configs/sft.py. InstructGPT (appendix C.2): one epoch, lr 9e-6, cosine decay to 10%,
batch 64 prompts with K = 4..9 responses each, no dropout; a 6B reward model for every policy size.
"""
from rlhf_jax import config_files

models = config_files.sibling(__file__, "models")


def get_config(preset="tiny"):
  name = "6.7b" if preset == "175b" else preset     # the paper uses a 6B RM for every policy
  c = models.base_config(preset, "rm")
  c.model = models.model_config(name, dropout_resid=0.0, dropout_attn=0.0)   # no dropout in RM
  c.k_max = 0              # responses per prompt in a batch; 0 = the largest K in the data
  c.norm_examples = 512    # demonstrations whose mean reward the bias subtracts (0 = off)
  c.data.norm_split = "train"
  # Where the comparisons come from: '' = the data's own comparisons dataset; else a data dir
  # holding tfds/ with one, e.g. the collect stage's ('auto' = <workdir>/collect).
  c.data.comparisons_dir = ""
  if preset == "tiny":
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.batch_size = 16
    c.eval_batch_size = 32
    c.seq_len = 32         # the longest [bos] prompt response [eos] of the offline task: 28 tokens
    # 2000 steps (2 passes over 10000 ranked prompts): at 1000 the 2 x 64 reward model had not
    # yet learnt to judge `add` on task seed 1 (held-out accuracy 0.73 -> 0.76).
    c.num_steps = 2000
    c.eval_every = 250
    c.log_every = 50
  elif preset == "smollm2":
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.0
    c.batch_size = 16
    c.eval_batch_size = 16
    c.seq_len = 128
    c.num_steps = 0
    c.num_epochs = 1.0
    # 16 prompts x 6 responses x 128 tokens through 30 layers: without rematerialisation and
    # micro-batches the backward pass wants ~28 GB on a CPU machine.
    c.model.remat = "full"
    c.grad_accum_steps = 4
  else:
    c.optimizer.lr = 9e-6
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.batch_size = 64
    c.eval_batch_size = 64
    c.seq_len = 1024
    c.num_steps = 0
    c.num_epochs = 1.0
  return c
