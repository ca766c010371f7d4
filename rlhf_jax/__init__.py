"""rlhf_jax: InstructGPT (SFT -> reward model -> PPO-ptx) in JAX/Flax."""

__version__ = "0.1.0"
