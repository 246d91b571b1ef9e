"""Pure, jittable objectives on arrays: what users import as ``from rlhf_jax import losses``.

- ``instructgpt``: the three InstructGPT steps (SFT / ptx NLL, the RM ranking loss, KL
  penalties, GAE, whitening, the PPO clipped losses, the KL controllers).
- ``unembed``: the SFT / ptx loss straight from final hidden states and the unembedding,
  chunked so no [B, T, V] logits are held (a custom gradient: a room of its own).
- ``common``: masked sums and means every module shares.

Nothing here calls a model; functions that need one live in ``rlhf_jax.objectives``.
"""

from rlhf_jax.losses.common import MAX_LOG_RATIO, WHITEN_EPS, masked_mean, masked_sum
from rlhf_jax.losses.instructgpt import (
    sft_loss, ranking_loss, pairwise_loss, kl_penalty, kl_penalized_rewards, gae, whiten,
    ppo_policy_loss, ppo_value_loss, entropy, adaptive_kl_update, KLControllerState,
    kl_controller_init, kl_controller_update)
from rlhf_jax.losses.unembed import sft_loss_from_hidden

__all__ = [
    "MAX_LOG_RATIO", "WHITEN_EPS", "KLControllerState", "adaptive_kl_update", "entropy",
    "gae", "kl_controller_init", "kl_controller_update", "kl_penalized_rewards", "kl_penalty",
    "masked_mean", "masked_sum", "pairwise_loss", "ppo_policy_loss", "ppo_value_loss",
    "ranking_loss", "sft_loss", "sft_loss_from_hidden", "whiten",
]
