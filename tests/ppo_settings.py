"""`ppo_iteration.Settings` for the PPO tests, from configs/ppo_ptx.py's tiny config (the one source
of the settings, through `ppo.settings_from_config`) with ptx, the missing-EOS penalty and the
gradient clip off, and the given fields replaced."""
import dataclasses
import os

from rlhf_jax import config_files
from rlhf_jax.train import ppo

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def tiny_settings(**fields):
  config = config_files.get_config(os.path.join(ROOT, "configs", "ppo_ptx.py"), "tiny")
  config.ppo.ptx_coef = 0.0
  config.ppo.missing_eos_penalty = 0.0
  config.optimizer.grad_clip = 0.0
  return dataclasses.replace(ppo.settings_from_config(config), **fields)
