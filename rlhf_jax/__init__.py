"""rlhf_jax: the InstructGPT recipe (SFT, reward model, PPO-ptx) in JAX / Flax NNX."""

__version__ = "0.1.0"
