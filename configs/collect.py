r"""Collect config: `--config=configs/collect.py:<preset>`.

  python -m rlhf_jax.main --config=configs/collect.py:tiny     # from <workdir>/sft/model

The SFT policy samples K responses per prompt and the simulated labeler ranks them; the reward
model then trains on them with `--config.data.comparisons_dir=<workdir>/collect` (configs/rm.py).
InstructGPT showed labelers K = 4 to 9 responses per prompt, sampled at temperature 1.
"""
import ml_collections

from rlhf_jax import config_files

models = config_files.sibling(__file__, "models")


def get_config(preset="tiny"):
  c = ml_collections.ConfigDict()
  c.name = preset
  c.stage = "collect"
  c.model = models.model_config(preset, dropout_resid=0.0, dropout_attn=0.0)
  c.mesh = models.mesh_config()
  c.init_from = "auto"           # 'auto' = <workdir>/sft/model, else a model path
  c.data = models.data_config()  # the `prompts` splits data.train_split and data.eval_split
  c.num_train_prompts = 0        # prompts of data.train_split to label (0 = all, 10000 offline)
  c.num_eval_prompts = 0         # prompts of data.eval_split (0 = all, 400 offline)
  c.min_k = 4                    # responses ranked per prompt, drawn in min_k..max_k (paper 4..9)
  c.max_k = 9
  c.temperature = 1.0            # sampling temperature of the policy
  c.labeler_temperature = 0.1    # Bradley-Terry noise in gold-score units (the offline task's)
  c.max_new_tokens = 256
  c.prompt_len = 256             # prompts left-padded (or cut on the left) to this many tokens
  c.batch_size = 64              # prompts per sampler call (each gives max_k rows)
  c.seed = 0                     # sampling, K and labeler noise
  if preset == "tiny":
    c.min_k = 6
    c.max_k = 6
    c.max_new_tokens = 24
    c.prompt_len = 24
    c.batch_size = 64
  elif preset == "smollm2":
    c.max_k = 6
    c.max_new_tokens = 32
    c.prompt_len = 48
    c.batch_size = 32
  return c
