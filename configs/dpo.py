r"""DPO config: `--config=configs/dpo.py:<preset>`.

  python -m rlhf_jax.main --config=configs/dpo.py:tiny \
      --config.data.comparisons_dir=<workdir>/collect                # from <workdir>/sft/model

Direct preference optimisation (Rafailov et al. 2023) as a baseline next to PPO-ptx: the policy
starts from the SFT model, which is also the frozen reference, and trains on the reward model's
comparisons (all C(K, 2) pairs of each K-way ranking, one batch element per prompt). In the
pipeline (configs/ppo_ptx.py) this is `config.dpo` and its stage runs when `config.dpo_run`.

The paper's settings: beta 0.1, lr 1e-6 (RMSprop, batch 64 pairs). Here AdamW (config.optimizer,
no weight decay) and, per preset, as many passes over the comparisons as the reward model makes.
"""
from rlhf_jax import config_files

models = config_files.sibling(__file__, "models")


def get_config(preset="tiny"):
  c = models.base_config(preset, "dpo")
  c.model = models.model_config(preset, dropout_resid=0.0, dropout_attn=0.0)   # like PPO
  c.beta = 0.1             # the implicit reward's scale (the KL coefficient); paper 0.1
  c.k_max = 0              # responses per prompt in a batch; 0 = the largest K in the data
  # Where the comparisons come from: '' = the data's own comparisons dataset; else a data dir
  # holding tfds/ with one, e.g. the collect stage's ('auto' = <workdir>/collect).
  c.data.comparisons_dir = ""
  c.optimizer.weight_decay = 0.0
  if preset == "tiny":
    # The reward model's batch and steps (16 prompts x 2000 steps: 3.2 passes over the 9848
    # ranked prompts of the collect stage); the PPO policy's learning rate.
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 10
    c.batch_size = 16
    c.eval_batch_size = 32
    c.seq_len = 32         # the longest [bos] prompt response [eos] of the offline task: 28 tokens
    c.num_steps = 2000
    c.eval_every = 250
    c.log_every = 50
  elif preset == "smollm2":
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_steps = 10
    c.batch_size = 16
    c.eval_batch_size = 16
    c.seq_len = 128
    c.num_steps = 0
    c.num_epochs = 1.0
    c.model.remat = "full"
    c.grad_accum_steps = 4
  else:
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_steps = 0
    c.batch_size = 64
    c.eval_batch_size = 64
    c.seq_len = 1024
    c.num_steps = 0
    c.num_epochs = 1.0
  return c
