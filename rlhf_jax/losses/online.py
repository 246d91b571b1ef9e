"""Critic-free online policy-gradient objectives (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Pure, jittable functions of arrays with the conventions of ``instructgpt.py``: float32
arithmetic whatever the input dtype, ``[B, T]`` masks (nonzero = valid), token-level masked
means ``Σ x·m / Σ m`` unless stated, a finite 0 (value and gradient) for a fully masked
batch, chex shape checks at trace time.

Group layout: the group baselines (GRPO, RLOO) expect ``B = n_prompts · G`` rows where
consecutive rows form a group, i.e. the layout of repeating each prompt G times
(``jnp.repeat(prompts, G, axis=0)``). Group sizes are static Python ints.

References:
- Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models" (GRPO): §4.1.1 eq. 3 (objective with the k3 KL term), §4.1.2
  (outcome supervision: ``Â_i,t = (r_i − mean(r)) / std(r)``).
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
  (Dr. GRPO): drops the std division (and the per-response length normalisation).
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs": the RLOO estimator (leave-one-out baseline).
- Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
  Models": token-level KL penalty in the reward, γ = 1 returns, global-batch
  advantage normalisation.
- Yu et al. 2025, "DAPO": token-level loss aggregation and the asymmetric clip-higher.
"""

from __future__ import annotations

import operator

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (MAX_LOG_RATIO, Array, ArrayLike, f32, masked_mean,
                                    valid_mask, zero_masked)
from rlhf_jax.losses.instructgpt import kl_penalized_rewards, kl_penalty, whiten

_LENGTH_NORMS = ("token", "sequence")

# Added to the group std (not the variance) before dividing, as verl's GRPO does
# (`(r - mean) / (std + 1e-6)`); TRL uses 1e-4. Only matters for near-identical groups.
GRPO_STD_EPS = 1e-6


def _grouped(fn: str, scores: ArrayLike, group_size: int) -> Array:
  """``scores[B]`` as float32 ``[B // G, G]`` (consecutive rows = one group)."""
  scores = jnp.asarray(scores)
  chex.assert_rank(scores, 1)
  g = operator.index(group_size)  # a static int: numpy ints pass, floats / tracers fail
  if g < 2:
    raise ValueError(f"{fn}: group_size must be >= 2 (a baseline needs other samples of "
                     f"the same prompt), got {g}")
  b = scores.shape[0]
  if b % g:
    raise ValueError(f"{fn}: batch size {b} is not a multiple of group_size {g}; rows must "
                     "be n_prompts * group_size with each prompt's samples consecutive")
  r = f32(scores).reshape(b // g, g)
  # Shift by the group's first score (every baseline below is shift-invariant): groups of
  # identical scores, common with 0/1 verifiers, then give exactly 0 rather than rounding
  # noise of mean(r) ≠ r, and large offsets do not cancel catastrophically.
  return r - r[:, :1]


def grpo_advantages(scores: ArrayLike, group_size: int, scale_by_std: bool = True,
                    eps: float = GRPO_STD_EPS) -> Array:
  """GRPO outcome-supervision advantages (Shao et al. 2024, §4.1.2).

  For each group of ``G`` samples of one prompt with scores ``r_1..r_G``:

      Â_i = (r_i − mean(r)) / (std(r) + eps)      (scale_by_std=True, GRPO)
      Â_i =  r_i − mean(r)                        (scale_by_std=False, Dr. GRPO)

  ``std`` is the UNBIASED (Bessel-corrected, ``ddof=1``) sample std. The paper only writes
  ``std(r)``; the widely used implementations (TRL's GRPOTrainer, verl) call
  ``torch.std``, whose default is unbiased, so this matches their advantage scale and
  hyper-parameters (for G = 2 it gives ±1/√2 instead of the ±1 of the biased std). Note
  this differs on purpose from ``whiten``, which uses the biased variance over a batch.
  A group of identical scores gets exactly 0.

  Args:
    scores: ``[B]`` sequence-level rewards, ``B = n_prompts · G``, consecutive rows one
      group (each prompt repeated ``G`` times).
    group_size: ``G`` (static int, ≥ 2).
    scale_by_std: divide by the group std (GRPO) or not (Dr. GRPO, Liu et al. 2025).
    eps: added to the std before dividing.

  Returns:
    ``[B]`` float32 advantages (one per response; broadcast over its tokens by
    ``grpo_policy_loss``).

  Raises:
    ValueError: if ``group_size < 2`` or ``B % group_size != 0``.
  """
  c = _grouped("grpo_advantages", scores, group_size)
  g = c.shape[1]
  adv = c - jnp.sum(c, axis=1, keepdims=True) / g
  if scale_by_std:
    var = jnp.sum(jnp.square(adv), axis=1, keepdims=True) / (g - 1)
    # sqrt has an infinite derivative at 0: a double where keeps d/dscores finite.
    pos = var > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
    adv = adv / (std + eps)
  return adv.reshape(-1)


def rloo_advantages(scores: ArrayLike, group_size: int) -> Array:
  """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, the RLOO estimator).

  For each group of ``K`` samples of one prompt: ``A_i = r_i − 1/(K−1) · Σ_{j≠i} r_j``
  (the baseline of sample i uses the other K−1 samples only, so it is independent of
  sample i and the gradient estimate stays unbiased). Equal to ``K/(K−1)·(r_i − mean r)``;
  advantages sum to 0 within a group and are exactly 0 for identical scores.

  Args:
    scores: ``[B]`` sequence-level rewards, ``B = n_prompts · K``, consecutive rows one
      group.
    group_size: ``K`` (static int, ≥ 2).

  Returns:
    ``[B]`` float32 advantages.

  Raises:
    ValueError: if ``group_size < 2`` or ``B % group_size != 0``.
  """
  c = _grouped("rloo_advantages", scores, group_size)
  k = c.shape[1]
  baseline = (jnp.sum(c, axis=1, keepdims=True) - c) / (k - 1)
  return (c - baseline).reshape(-1)


def reinforce_pp_advantages(scores: ArrayLike, logprobs: ArrayLike, ref_logprobs: ArrayLike,
                            mask: ArrayLike, kl_coef: ArrayLike, kind: str = "k1") -> Array:
  """REINFORCE++ token advantages (Hu 2025): KL-shaped returns, globally whitened.

  Per-token rewards ``r_t = −β·kl_t`` plus the score at the row's last valid token
  (``kl_penalized_rewards``), undiscounted returns-to-go over the valid tokens, no critic:

      A_t = Σ_{s ≥ t, valid} r_s  = score − β Σ_{s ≥ t} kl_s

  then normalised with the mean and (biased) std of ALL valid tokens of the batch
  (``whiten``), the paper's global-batch normalisation, rather than per prompt.

  Args:
    scores: ``[B]`` reward-model / verifier scores.
    logprobs: ``[B, T]`` log-probs of the sampled tokens under the rollout policy.
    ref_logprobs: ``[B, T]`` under the reference model.
    mask: ``[B, T]``, 1 = response token.
    kl_coef: β (scalar, may be traced).
    kind: KL estimator for the reward (``"k1"`` as in the paper; see ``kl_penalty``).

  Returns:
    ``[B, T]`` float32 advantages, 0 where masked (everywhere if nothing is valid).
  """
  rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kind)
  # rewards is 0 at masked positions, so a reverse cumsum is the return over valid tokens.
  rtg = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)
  return whiten(rtg, mask)


def grpo_policy_loss(logprobs: ArrayLike, old_logprobs: ArrayLike, ref_logprobs: ArrayLike,
                     advantages: ArrayLike, mask: ArrayLike, clip_eps: float,
                     kl_coef: ArrayLike, clip_eps_high: float | None = None,
                     length_norm: str = "token") -> tuple[Array, dict[str, Array]]:
  """GRPO objective (Shao et al. 2024, eq. 3) as a loss to minimise.

  With ``ρ_t = exp(logprobs − old_logprobs)`` (log-ratio clamped to ±``MAX_LOG_RATIO``),
  ``d_t = logprobs − ref_logprobs`` and the k3 estimator
  ``D_t = π_ref/π − log(π_ref/π) − 1 = e^(−d_t) − 1 + d_t`` (eq. 4), per token:

      ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high)) + β · D_t

  The KL to the reference is a LOSS term, not a reward penalty (unlike InstructGPT).
  ``A_t`` is the response's advantage broadcast over its tokens (``[B]`` input) or given
  per token (``[B, T]``). Aggregation (``length_norm``):

  - ``"token"`` (default, the library's convention; DAPO, Yu et al. 2025):
    ``Σ ℓ·m / Σ m`` over the whole batch, so every token weighs the same.
  - ``"sequence"`` (eq. 3 as written: ``1/G Σ_i 1/|o_i| Σ_t``): per-response masked
    mean, then the mean over responses with at least one valid token; long responses'
    tokens weigh less.

  Args:
    logprobs: ``[B, T]`` current policy log-probs of the sampled tokens.
    old_logprobs: ``[B, T]`` log-probs at sampling time.
    ref_logprobs: ``[B, T]`` reference-model log-probs.
    advantages: ``[B]`` (e.g. ``grpo_advantages``) or ``[B, T]``.
    mask: ``[B, T]``, 1 = response token.
    clip_eps: ε (GRPO: 0.2).
    kl_coef: β (GRPO: 0.04); scalar, may be traced.
    clip_eps_high: optional upper ε (clip-higher); defaults to ``clip_eps``.
    length_norm: ``"token"`` or ``"sequence"``.

  Returns:
    ``(loss, aux)``: scalar float32 loss (0 with zero gradient when fully masked), and
    ``aux`` with ``pg_loss`` and ``kl`` (mean k3, same aggregation as the loss, so
    ``loss = pg_loss + β·kl``), and token-level ``clip_frac``, ``approx_kl`` (k1 of old
    vs new) and ``ratio_mean``.

  Raises:
    ValueError: on an unknown ``length_norm``.
  """
  if length_norm not in _LENGTH_NORMS:
    raise ValueError(f"grpo_policy_loss: length_norm must be one of {_LENGTH_NORMS}, "
                     f"got {length_norm!r}")
  logprobs, old_logprobs = jnp.asarray(logprobs), jnp.asarray(old_logprobs)
  ref_logprobs, mask = jnp.asarray(ref_logprobs), jnp.asarray(mask)
  advantages = jnp.asarray(advantages)
  chex.assert_rank(logprobs, 2)
  chex.assert_equal_shape([logprobs, old_logprobs, ref_logprobs, mask])
  if advantages.ndim == 1:
    chex.assert_equal_shape_prefix([advantages, mask], 1)
    advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
  chex.assert_equal_shape([advantages, mask])
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  valid = valid_mask(mask)
  # Zero padded slots before any non-linearity: garbage / -inf there must not leak.
  lp = zero_masked(f32(logprobs), valid)
  log_ratio = zero_masked(lp - f32(old_logprobs), valid)
  adv = zero_masked(f32(advantages), valid)
  ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(pg1, pg2)
  kl = kl_penalty(lp, zero_masked(f32(ref_logprobs), valid), "k3")

  if length_norm == "token":
    reduce = lambda x: masked_mean(x, mask)
  else:
    has_token = jnp.any(valid, axis=1)
    reduce = lambda x: masked_mean(masked_mean(x, mask, axis=1), has_token)
  pg_loss, kl_mean = reduce(pg), reduce(kl)
  loss = pg_loss + f32(kl_coef) * kl_mean
  aux = dict(
      pg_loss=pg_loss,
      kl=kl_mean,
      clip_frac=masked_mean((pg2 > pg1).astype(jnp.float32), mask),
      approx_kl=masked_mean(-log_ratio, mask),
      ratio_mean=masked_mean(ratio, mask),
  )
  return loss, jax.lax.stop_gradient(aux)
