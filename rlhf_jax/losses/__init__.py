"""Pure, jittable objectives on arrays: what users import as ``from rlhf_jax import losses``.

- ``instructgpt``: the three InstructGPT steps (SFT / ptx NLL, the RM ranking loss, KL
  penalties, GAE, whitening, the PPO clipped losses, the KL controllers).
- ``online``: critic-free policy gradients: GRPO / Dr. GRPO group advantages and the GRPO
  loss (k3 KL as a loss term), RLOO leave-one-out and REINFORCE++ advantages.
- ``preference``: offline preference losses on sequence log-probs: DPO (cDPO label
  smoothing, IPO) and K-way Plackett–Luce DPO with ties.
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
from rlhf_jax.losses.online import (
    GRPO_STD_EPS, grpo_advantages, grpo_policy_loss, reinforce_pp_advantages,
    rloo_advantages)
from rlhf_jax.losses.preference import dpo_loss, plackett_luce_dpo_loss
from rlhf_jax.losses.unembed import sft_loss_from_hidden

__all__ = [
    "GRPO_STD_EPS", "MAX_LOG_RATIO", "WHITEN_EPS", "KLControllerState",
    "adaptive_kl_update", "dpo_loss", "entropy", "gae", "grpo_advantages",
    "grpo_policy_loss", "kl_controller_init", "kl_controller_update",
    "kl_penalized_rewards", "kl_penalty", "masked_mean", "masked_sum", "pairwise_loss",
    "plackett_luce_dpo_loss", "ppo_policy_loss", "ppo_value_loss", "ranking_loss",
    "reinforce_pp_advantages", "rloo_advantages", "sft_loss", "sft_loss_from_hidden",
    "whiten",
]
