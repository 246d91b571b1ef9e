"""Offline preference objectives on sequence log-probs (DPO, cDPO, IPO, Plackett–Luce DPO).

Pure, jittable functions of arrays with the conventions of ``instructgpt.py``: float32
arithmetic whatever the input dtype, a finite 0 (value and gradient) for an empty batch,
chex shape checks at trace time, aux statistics under ``stop_gradient``.

Inputs are SEQUENCE log-probs ``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over the response
tokens, for the policy and for the frozen reference model, computed by the caller (e.g.
``masked_sum`` of token log-probs). Every loss depends on them only through the implicit
rewards ``r̂(y) = β · (log π(y|x) − log π_ref(y|x))`` (Rafailov et al. 2023, eq. 5).

References:
- Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model": eq. 7 (DPO loss), Appendix A.3 (the Plackett–Luce generalisation).
- Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO,
  label smoothing).
- Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences": eq. 17 (IPO's empirical loss).
- Breslow 1974, "Covariance analysis of censored survival data" (Biometrics 30:89–99):
  the tie approximation used by ``plackett_luce_dpo_loss``.
- Kalbfleisch & Prentice 1973, "Marginal likelihoods based on Cox's regression and life
  model" (Biometrika 60:267–278): the exact tie likelihood Breslow approximates.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (Array, ArrayLike, f32, masked_mean, safe_div,
                                    valid_mask, zero_masked)

_DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _check_beta(fn: str, beta: ArrayLike) -> None:
  if isinstance(beta, (int, float)) and not beta > 0:  # traced: unchecked
    raise ValueError(f"{fn}: beta must be > 0, got {beta}")


def dpo_loss(policy_chosen: ArrayLike, policy_rejected: ArrayLike, ref_chosen: ArrayLike,
             ref_rejected: ArrayLike, beta: ArrayLike, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[Array, dict[str, Array]]:
  """DPO (Rafailov et al. 2023, eq. 7) and IPO (Azar et al. 2023, eq. 17) on pairs.

  With the log-ratio difference
  ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``, averaged over the
  batch:

  - ``"sigmoid"`` (DPO): ``−(1 − ε) log σ(β h) − ε log σ(−β h)``; ``ε = label_smoothing``
    is cDPO's assumed probability that a label is flipped (Mitchell 2023), 0 = plain DPO.
  - ``"ipo"``: ``(h − 1/(2β))²`` (β plays IPO's τ). The equation is agnostic to how the
    log-probs are aggregated; TRL feeds length-averaged log-probs for IPO, this function
    takes whatever the caller passes.

  Args:
    policy_chosen: ``[B]`` policy sequence log-probs of the preferred responses.
    policy_rejected: ``[B]`` policy sequence log-probs of the other responses.
    ref_chosen: ``[B]`` reference-model log-probs of the preferred responses.
    ref_rejected: ``[B]`` reference-model log-probs of the other responses.
    beta: β > 0 (DPO: 0.1); scalar, may be traced.
    label_smoothing: ε in [0, 0.5) for ``"sigmoid"``; must be 0 for ``"ipo"``.
    loss_type: ``"sigmoid"`` or ``"ipo"``.

  Returns:
    ``(loss, aux)``: scalar float32 loss (0 for an empty batch); ``aux`` has
    ``chosen_rewards`` / ``rejected_rewards`` (batch means of the implicit rewards
    ``β·(log π − log π_ref)``), ``margin`` (mean ``β h``), ``accuracy`` (fraction with
    ``h > 0``) and ``num_pairs``.

  Raises:
    ValueError: on an unknown ``loss_type``, β ≤ 0, or a label smoothing out of range
      (or non-zero with IPO).
  """
  if loss_type not in _DPO_LOSS_TYPES:
    raise ValueError(f"dpo_loss: loss_type must be one of {_DPO_LOSS_TYPES}, "
                     f"got {loss_type!r}")
  _check_beta("dpo_loss", beta)
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if loss_type == "ipo" and label_smoothing:
    raise ValueError("dpo_loss: label_smoothing is a DPO (sigmoid) option; IPO has none")
  arrays = [jnp.asarray(x) for x in (policy_chosen, policy_rejected, ref_chosen,
                                     ref_rejected)]
  chex.assert_rank(arrays[0], 1)
  chex.assert_equal_shape(arrays)
  pc, pr, rc, rr = (f32(x) for x in arrays)
  beta = f32(beta)
  chosen_lr, rejected_lr = pc - rc, pr - rr
  h = chosen_lr - rejected_lr
  if loss_type == "sigmoid":
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
    if label_smoothing:
      losses = losses - label_smoothing * jax.nn.log_sigmoid(-beta * h)
  else:
    losses = jnp.square(h - 0.5 / beta)
  n = jnp.float32(h.shape[0])
  mean = lambda x: safe_div(jnp.sum(x), n)
  aux = dict(
      chosen_rewards=mean(beta * chosen_lr),
      rejected_rewards=mean(beta * rejected_lr),
      margin=mean(beta * h),
      accuracy=mean((h > 0).astype(jnp.float32)),
      num_pairs=n,
  )
  return mean(losses), jax.lax.stop_gradient(aux)


def plackett_luce_dpo_loss(policy_logps: ArrayLike, ref_logps: ArrayLike, ranks: ArrayLike,
                           valid: ArrayLike, beta: ArrayLike
                           ) -> tuple[Array, dict[str, Array]]:
  """K-way DPO under the Plackett–Luce model (Rafailov et al. 2023, Appendix A.3).

  Implicit rewards ``u_k = β (log π(y_k) − log π_ref(y_k))``. For a strict ranking
  ``τ(1) ≻ … ≻ τ(K)`` (lower rank = better, as in ``ranking_loss``) the PL negative
  log-likelihood of App. A.3 is

      loss_b = −Σ_{s=1}^{K−1} [ u_τ(s) − log Σ_{j=s}^{K} exp u_τ(j) ]

  (summed over stages, not averaged: for K = 2 it is exactly DPO's ``−log σ(u_w − u_l)``,
  eq. 7).

  Ties (equal ranks) are "order unobserved". The exact likelihood of such a partial
  ranking sums the PL probability over every ordering of each tied group (Kalbfleisch &
  Prentice 1973), which costs d! (or 2^d) terms per group; we use Breslow's (1974)
  approximation instead: each item i of a tied group is scored against its whole risk
  set, every valid item not ranked strictly above it (the other tied items included),

      loss_b = −Σ_{i valid, not in the last group} [ u_i − log Σ_{j valid: rank_j ≥ rank_i}
                                                      exp u_j ]

  which equals the exact PL term whenever the group has one item. The LAST (worst) group
  is skipped: the exact likelihood of "these are tied for last" is 1 (all their orderings
  are compatible), so it carries no information, and for a single item the PL term is
  ``u − log e^u = 0`` anyway. Consequences: K = 2 with distinct ranks is DPO exactly; K = 2
  tied contributes nothing; the loss is invariant to the order of the slots.

  Invalid slots are ignored (their values may be garbage, even NaN). A prompt with fewer
  than 2 valid items of distinct ranks contributes nothing, and ``loss`` is the mean of
  ``loss_b`` over the prompts that contribute (0 if none). Memory is O(B·K²).

  Args:
    policy_logps: ``[B, K]`` policy sequence log-probs of the K responses of each prompt.
    ref_logps: ``[B, K]`` reference-model sequence log-probs.
    ranks: ``[B, K]`` ranks (int or float); lower = better, equal = tie.
    valid: ``[B, K]``, 1 = the slot holds a real response.
    beta: β > 0; scalar, may be traced.

  Returns:
    ``(loss, aux)``: scalar float32 loss; ``aux`` has ``accuracy`` (fraction of ordered
    valid pairs ``rank_w < rank_l`` with ``u_w > u_l``), ``margin`` (mean ``u_w − u_l``
    over those pairs), ``num_pairs`` and ``num_prompts`` (prompts that contribute).

  Raises:
    ValueError: if β ≤ 0.
  """
  _check_beta("plackett_luce_dpo_loss", beta)
  policy_logps, ref_logps = jnp.asarray(policy_logps), jnp.asarray(ref_logps)
  ranks, valid = jnp.asarray(ranks), jnp.asarray(valid)
  chex.assert_rank(policy_logps, 2)
  chex.assert_equal_shape([policy_logps, ref_logps, ranks, valid])
  ok = valid_mask(valid)
  # Zero each input first: a -inf / NaN in an empty slot must not reach u or its gradient.
  u = f32(beta) * (zero_masked(f32(policy_logps), ok) - zero_masked(f32(ref_logps), ok))
  k = u.shape[1]
  rank_i, rank_j = ranks[:, :, None], ranks[:, None, :]
  ok_j = ok[:, None, :]
  # [B, i, j]: j is valid and ranked strictly below i / not above i (i's risk set).
  below = ok_j & (rank_j > rank_i)
  # i itself is always in its own set, so no row is all -inf: invalid rows (discarded
  # below) stay finite without relying on how a logsumexp treats an empty set.
  risk = (ok_j & (rank_j >= rank_i)) | jnp.eye(k, dtype=bool)
  stage = ok & jnp.any(below, axis=2)  # i valid and not in the last group
  lse = jax.nn.logsumexp(jnp.where(risk, u[:, None, :], -jnp.inf), axis=2)
  nll = jnp.where(stage, lse - u, 0.0)
  loss_b = jnp.sum(nll, axis=1)
  contributes = jnp.any(stage, axis=1)
  loss = masked_mean(loss_b, contributes)

  pair = ok[:, :, None] & below  # (w = i, l = j) with rank_w < rank_l, both valid
  pairf = pair.astype(jnp.float32)
  diff = u[:, :, None] - u[:, None, :]
  num_pairs = jnp.sum(pairf)
  aux = dict(
      accuracy=safe_div(jnp.sum(pairf * (diff > 0)), num_pairs),
      margin=safe_div(jnp.sum(jnp.where(pair, diff, 0.0)), num_pairs),
      num_pairs=num_pairs,
      num_prompts=jnp.sum(contributes.astype(jnp.float32)),
  )
  return loss, jax.lax.stop_gradient(aux)
