"""The InstructGPT objectives as pure, jittable functions on arrays.

Everything here is a function of arrays only (no model calls), so users can import
the objectives directly and the trainers use nothing else. Conventions shared by
every function:

- Inputs may be float32 or bfloat16; all arithmetic is done in float32 and every
  float output is float32 (bf16 sums over thousands of tokens lose too much).
- ``mask`` arguments are ``[B, T]`` bool / int / float, 1 (or True) = a valid token.
  Masked means are token-level over the whole batch, ``sum(x * m) / sum(m)``, unless an
  ``axis`` argument says otherwise.
- A fully masked batch gives a finite 0 for the value AND the gradient (never NaN):
  denominators are guarded with a double ``where`` and masked entries are replaced by
  zeros before any non-linearity, so garbage (even inf / NaN) in padded slots cannot leak.
- Shapes are checked with chex at trace time.

References:
- Ouyang et al. 2022, "Training language models to follow instructions with human
  feedback" (InstructGPT): eq. 1 (reward-model ranking loss), eq. 2 (PPO-ptx objective).
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms": eq. 7 (clipped
  surrogate), eq. 9 (value / entropy terms).
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation": eq. 16 (GAE).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences": §2.2
  (KL penalty, adaptive KL controller, reward normalisation).
- Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL": dual clip.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import (MAX_LOG_RATIO, WHITEN_EPS, Array, ArrayLike, f32,
                                    masked_max, safe_div, valid_mask, zero_masked,
                                    masked_mean)

_KL_KINDS = ("k1", "k2", "k3")


# ------------------------------------------------------------------ step 1: SFT / ptx


def sft_loss(logits: ArrayLike, targets: ArrayLike, mask: ArrayLike) -> Array:
  """Token-level masked negative log-likelihood (SFT, and the PPO-ptx pretraining term).

  ``loss = Σ_{b,t} m_bt · (−log softmax(logits_bt)[targets_bt]) / Σ m``. In InstructGPT
  eq. 2 this is the ``γ · E_x~D_pretrain[log π(x)]`` term (with the sign flipped to a loss).
  Targets must already be aligned with logits (``targets[:, t]`` is the token predicted
  from position ``t``); prompt tokens and padding are excluded through ``mask``.

  Args:
    logits: ``[B, T, V]`` float32 / bfloat16.
    targets: ``[B, T]`` integer token ids; values at masked positions are ignored
      (e.g. -100 is fine).
    mask: ``[B, T]``, 1 = token counted in the loss.

  Returns:
    Scalar float32 loss; 0 if no token is valid.
  """
  logits, targets, mask = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
  chex.assert_rank([logits, targets, mask], [3, 2, 2])
  chex.assert_equal_shape([targets, mask])
  chex.assert_equal_shape_prefix([logits, targets], 2)
  chex.assert_type(targets, int)
  valid = valid_mask(mask)
  # Masked targets may be out of range (-100, pad); point them at token 0 instead.
  safe_targets = jnp.where(valid, targets, 0)
  logp = jax.nn.log_softmax(f32(logits), axis=-1)
  tok_logp = jnp.take_along_axis(logp, safe_targets[..., None], axis=-1)[..., 0]
  return masked_mean(-tok_logp, mask)


# ---------------------------------------------------------------- step 2: reward model


def ranking_loss(rewards: ArrayLike, ranks: ArrayLike, valid: ArrayLike
                 ) -> tuple[Array, dict[str, Array]]:
  """InstructGPT eq. 1: K-way ranking loss of a reward model.

  For each prompt ``b``, over all pairs ``(w, l)`` of valid slots with
  ``ranks[b, w] < ranks[b, l]`` (lower rank = preferred; ties are dropped):

      loss_b = −1/N_b · Σ_(w,l) log σ(r_bw − r_bl),     N_b = number of such pairs

  and ``loss = mean of loss_b over prompts with N_b ≥ 1``. All C(K,2) pairs of a prompt form
  ONE batch element, so each prompt weighs the same whatever its K (the paper's
  1/C(K,2) normalisation). Uses ``jax.nn.log_sigmoid`` (stable for reward gaps of 1e4);
  the pair tensor is ``[B, K, K]``, i.e. O(B·K²) memory.

  Args:
    rewards: ``[B, K]`` scalar rewards of the K responses of each prompt.
    ranks: ``[B, K]`` ranks (int or float); lower = better, equal = tie.
    valid: ``[B, K]``, 1 = the slot holds a real response.

  Returns:
    ``(loss, aux)`` with scalar float32 ``loss`` (0 if there is no pair) and ``aux``:
    ``accuracy`` (fraction of all pairs with ``r_w > r_l``), ``num_pairs``,
    ``num_prompts`` (prompts with ≥ 1 pair), ``margin`` (mean ``r_w − r_l`` over pairs).
  """
  rewards, ranks, valid = jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(valid)
  chex.assert_rank(rewards, 2)
  chex.assert_equal_shape([rewards, ranks, valid])
  ok = valid_mask(valid)
  r = zero_masked(f32(rewards), ok)
  # pair[b, i, j]: slot i preferred over slot j, both valid, not a tie.
  pair = ok[:, :, None] & ok[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  diff = r[:, :, None] - r[:, None, :]  # r_w − r_l for w = i, l = j
  pair_loss = -jax.nn.log_sigmoid(diff)
  pairf = pair.astype(jnp.float32)
  n_b = jnp.sum(pairf, axis=(1, 2))
  loss_b = safe_div(jnp.sum(jnp.where(pair, pair_loss, 0.0), axis=(1, 2)), n_b)
  has_pair = n_b > 0
  loss = masked_mean(loss_b, has_pair)
  num_pairs = jnp.sum(n_b)
  aux = dict(
      accuracy=safe_div(jnp.sum(pairf * (diff > 0)), num_pairs),
      num_pairs=num_pairs,
      num_prompts=jnp.sum(has_pair.astype(jnp.float32)),
      margin=safe_div(jnp.sum(jnp.where(pair, diff, 0.0)), num_pairs),
  )
  return loss, jax.lax.stop_gradient(aux)


def pairwise_loss(chosen: ArrayLike, rejected: ArrayLike, margin: ArrayLike = 0.0
                  ) -> tuple[Array, dict[str, Array]]:
  """Chosen/rejected reward-model loss: the K = 2 case of InstructGPT eq. 1.

  ``loss = mean_b −log σ(r_chosen − r_rejected − margin)``. With ``margin = 0`` this equals
  ``ranking_loss`` on ``[chosen, rejected]`` with ranks ``[0, 1]``. A positive margin
  (scalar or per example, as in Touvron et al. 2023, Llama 2 §3.2.2) asks for a larger gap.

  Args:
    chosen: ``[B]`` rewards of the preferred responses.
    rejected: ``[B]`` rewards of the other responses.
    margin: scalar or ``[B]``.

  Returns:
    ``(loss, aux)``: scalar float32 loss (0 for an empty batch); ``aux`` has ``accuracy``
    (fraction with ``chosen > rejected``), ``num_pairs`` and ``margin`` (mean gap
    ``chosen − rejected``).
  """
  chosen, rejected = jnp.asarray(chosen), jnp.asarray(rejected)
  chex.assert_rank(chosen, 1)
  chex.assert_equal_shape([chosen, rejected])
  diff = f32(chosen) - f32(rejected)
  losses = -jax.nn.log_sigmoid(diff - f32(margin))
  n = jnp.float32(diff.shape[0])
  aux = dict(
      accuracy=safe_div(jnp.sum((diff > 0).astype(jnp.float32)), n),
      num_pairs=n,
      margin=safe_div(jnp.sum(diff), n),
  )
  return safe_div(jnp.sum(losses), n), jax.lax.stop_gradient(aux)


# ------------------------------------------------------------------- step 3: PPO-ptx


def kl_penalty(logprobs: ArrayLike, ref_logprobs: ArrayLike, kind: str = "k1") -> Array:
  """Per-token KL estimators between the policy and the reference (SFT) model.

  With ``d = logprobs − ref_logprobs`` (log π(a)/π_ref(a) of the sampled token):
  ``k1 = d`` (InstructGPT eq. 2's ``log(π/π_SFT)``), ``k2 = d²/2``,
  ``k3 = e^(−d) − 1 + d`` (Schulman 2020, "Approximating KL divergence": unbiased and ≥ 0).
  For k3 the exponent is clamped at ``MAX_LOG_RATIO`` (see module constant) so
  ``d = −50`` stays finite.

  Args:
    logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy.
    ref_logprobs: ``[B, T]`` under the reference model.
    kind: ``"k1"``, ``"k2"`` or ``"k3"``.

  Returns:
    ``[B, T]`` float32 estimates (unmasked: the caller masks).
  """
  if kind not in _KL_KINDS:
    raise ValueError(f"kl_penalty: kind must be one of {_KL_KINDS}, got {kind!r}")
  logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
  chex.assert_equal_shape([logprobs, ref_logprobs])
  d = f32(logprobs) - f32(ref_logprobs)
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  return jnp.expm1(jnp.minimum(-d, MAX_LOG_RATIO)) + d


def kl_penalized_rewards(scores: ArrayLike, logprobs: ArrayLike, ref_logprobs: ArrayLike,
                         mask: ArrayLike, kl_coef: ArrayLike, kind: str = "k1") -> Array:
  """Per-token PPO rewards: InstructGPT eq. 2 / Ziegler et al. 2019 §2.2.

  ``r_t = −β · kl_t`` on every valid token (``kl_t`` from ``kl_penalty(kind)``), 0 where
  ``mask = 0``, and the reward-model score added at each row's last valid token
  (the largest ``t`` with ``mask = 1``). Rows with no valid token get all zeros.

  Args:
    scores: ``[B]`` reward-model scores of the responses.
    logprobs: ``[B, T]`` policy log-probs of the sampled tokens.
    ref_logprobs: ``[B, T]`` reference log-probs.
    mask: ``[B, T]``, 1 = response token.
    kl_coef: β, scalar (Python float or traced array, e.g. a controller's state).
    kind: KL estimator, see ``kl_penalty``.

  Returns:
    ``[B, T]`` float32 rewards.
  """
  scores, mask = jnp.asarray(scores), jnp.asarray(mask)
  logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
  chex.assert_rank([scores, mask], [1, 2])
  chex.assert_equal_shape([logprobs, ref_logprobs, mask])
  chex.assert_equal_shape_prefix([scores, mask], 1)
  valid = valid_mask(mask)
  # Zero padded slots first: a padded ref log-prob of -inf must not make NaN gradients.
  kl = kl_penalty(zero_masked(f32(logprobs), valid),
                  zero_masked(f32(ref_logprobs), valid), kind)
  rewards = jnp.where(valid, -f32(kl_coef) * kl, 0.0)
  t = mask.shape[1]
  last = jnp.max(jnp.where(valid, jnp.arange(t), -1), axis=1)  # -1: no valid token
  at_last = jax.nn.one_hot(last, t, dtype=jnp.float32)           # one_hot(-1) = zeros
  return rewards + at_last * f32(scores)[:, None]


def gae(rewards: ArrayLike, values: ArrayLike, mask: ArrayLike, gamma: ArrayLike,
        lam: ArrayLike) -> tuple[Array, Array]:
  """Generalized advantage estimation (Schulman et al. 2016, eq. 16) by a reverse scan.

  Over the valid tokens of a row, with ``V_{t+1} = 0`` after the row's last valid token
  (the episode ends there — everything past it is terminal):

      δ_t = r_t + γ V_{t+1} − V_t,      A_t = δ_t + γλ A_{t+1}

  Masked positions are skipped: they get advantage 0 and do not cut the chain, so with a
  hole in the mask ``t+1`` means the next VALID token (for the usual right-padded
  responses this is just the next position). Returns are ``A + V`` (the λ-return, the
  value target), 0 where masked.

  Args:
    rewards: ``[B, T]`` per-token rewards (e.g. ``kl_penalized_rewards``).
    values: ``[B, T]`` value estimates ``V(s_t)``.
    mask: ``[B, T]``, 1 = action token.
    gamma: discount γ (InstructGPT: 1).
    lam: GAE λ (InstructGPT: 0.95).

  Returns:
    ``(advantages, returns)``, each ``[B, T]`` float32 and 0 where masked.
  """
  rewards, values, mask = jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)
  chex.assert_rank(rewards, 2)
  chex.assert_equal_shape([rewards, values, mask])
  valid = valid_mask(mask)
  r = zero_masked(f32(rewards), valid)
  v = zero_masked(f32(values), valid)
  gamma, lam = f32(gamma), f32(lam)

  def step(carry, inp):
    next_v, next_a = carry
    r_t, v_t, ok_t = inp
    delta = r_t + gamma * next_v - v_t
    a_t = delta + gamma * lam * next_a
    # A masked step passes the carry through unchanged and emits 0.
    carry = (jnp.where(ok_t, v_t, next_v), jnp.where(ok_t, a_t, next_a))
    return carry, jnp.where(ok_t, a_t, 0.0)

  zeros = jnp.zeros(r.shape[:1], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
  adv = adv_tb.T
  return adv, jnp.where(valid, adv + v, 0.0)


def whiten(x: ArrayLike, mask: ArrayLike, shift_mean: bool = True) -> Array:
  """Whitens ``x`` with its masked statistics (advantage / reward normalisation).

  ``μ = masked_mean(x)``, ``σ² = masked_mean((x − μ)²)`` (biased), and
  ``y = (x − μ) / sqrt(σ² + 1e-8)``. With ``shift_mean=False`` the mean is added back,
  ``y + μ`` (rescale only, as Ziegler et al. 2019 do for rewards).

  Args:
    x: ``[...]`` values (typically ``[B, T]`` advantages).
    mask: same shape, 1 = valid.
    shift_mean: whether to keep the mean removed.

  Returns:
    float32 array like ``x``; 0 where masked (and everywhere if nothing is valid).
  """
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  chex.assert_equal_shape([x, mask])
  valid = valid_mask(mask)
  x = zero_masked(f32(x), valid)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  y = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
  if not shift_mean:
    y = y + mean
  return jnp.where(valid, y, 0.0)


def ppo_policy_loss(logprobs: ArrayLike, old_logprobs: ArrayLike, advantages: ArrayLike,
                    mask: ArrayLike, clip_eps: float, clip_eps_high: float | None = None,
                    dual_clip: float | None = None) -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

  With ``ρ_t = exp(logprobs − old_logprobs)`` (log-ratio clamped to ±``MAX_LOG_RATIO``
  before exp; no effect on any realistic ratio):

      loss = masked_mean( max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high)) )

  token-level over the whole batch. ``ε_low = clip_eps``; ``ε_high = clip_eps_high`` or
  ``clip_eps`` (asymmetric "clip-higher" when set). ``dual_clip = c > 1`` (Ye et al. 2020)
  further bounds the loss of negative-advantage tokens by ``−c·A_t``.

  Args:
    logprobs: ``[B, T]`` current policy log-probs of the sampled tokens.
    old_logprobs: ``[B, T]`` log-probs at sampling time.
    advantages: ``[B, T]`` (usually whitened) advantages.
    mask: ``[B, T]``, 1 = action token.
    clip_eps: ε (InstructGPT: 0.2).
    clip_eps_high: optional upper ε.
    dual_clip: optional dual-clip constant c > 1.

  Returns:
    ``(loss, aux)``: scalar float32 loss (0 when fully masked); ``aux`` has ``clip_frac``
    (fraction of tokens where the clipped term is taken, i.e. gets no gradient),
    ``approx_kl`` (k1: masked mean of ``old − new``), ``approx_kl_k2`` (½ masked mean of
    ``d²``), ``ratio_mean``, ``ratio_max`` and, with dual clip, ``dual_clip_frac``.
  """
  logprobs, old_logprobs = jnp.asarray(logprobs), jnp.asarray(old_logprobs)
  advantages, mask = jnp.asarray(advantages), jnp.asarray(mask)
  chex.assert_rank(logprobs, 2)
  chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
  if isinstance(dual_clip, (int, float)) and not dual_clip > 1.0:  # traced: unchecked
    raise ValueError(f"ppo_policy_loss: dual_clip must be > 1, got {dual_clip}")
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  valid = valid_mask(mask)
  log_ratio = zero_masked(f32(logprobs) - f32(old_logprobs), valid)
  adv = zero_masked(f32(advantages), valid)
  ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(pg1, pg2)
  aux = dict(clip_frac=masked_mean((pg2 > pg1).astype(jnp.float32), mask))
  if dual_clip is not None:
    pg3 = -adv * dual_clip
    use3 = (adv < 0) & (pg3 < pg)
    pg = jnp.where(adv < 0, jnp.minimum(pg, pg3), pg)
    aux["dual_clip_frac"] = masked_mean(use3.astype(jnp.float32), mask)
  loss = masked_mean(pg, mask)
  aux.update(
      approx_kl=masked_mean(-log_ratio, mask),
      approx_kl_k2=0.5 * masked_mean(jnp.square(log_ratio), mask),
      ratio_mean=masked_mean(ratio, mask),
      ratio_max=masked_max(ratio, valid),
  )
  return loss, jax.lax.stop_gradient(aux)


def ppo_value_loss(values: ArrayLike, old_values: ArrayLike, returns: ArrayLike,
                   mask: ArrayLike, clip_eps: float | None
                   ) -> tuple[Array, dict[str, Array]]:
  """Clipped value loss (the PPO2 value clipping; Schulman et al. 2017 eq. 9's L^VF).

  ``v_clip = v_old + clip(v − v_old, −ε, ε)`` and

      loss = 0.5 · masked_mean( max((v − R)², (v_clip − R)²) )

  ``clip_eps=None`` gives the unclipped ``0.5 · masked_mean((v − R)²)``.

  Args:
    values: ``[B, T]`` current value predictions.
    old_values: ``[B, T]`` predictions at rollout time.
    returns: ``[B, T]`` targets (``gae``'s returns).
    mask: ``[B, T]``, 1 = action token.
    clip_eps: ε in value units, or None.

  Returns:
    ``(loss, aux)``: scalar float32 loss (0 when fully masked); ``aux`` has ``clip_frac``
    (fraction of tokens where the clipped error is the larger one).
  """
  values, old_values = jnp.asarray(values), jnp.asarray(old_values)
  returns, mask = jnp.asarray(returns), jnp.asarray(mask)
  chex.assert_rank(values, 2)
  chex.assert_equal_shape([values, old_values, returns, mask])
  valid = valid_mask(mask)
  v = zero_masked(f32(values), valid)
  v_old = zero_masked(f32(old_values), valid)
  ret = zero_masked(f32(returns), valid)
  err = jnp.square(v - ret)
  if clip_eps is None:
    return 0.5 * masked_mean(err, mask), dict(clip_frac=jnp.float32(0.0))
  # Exactly v where the clip is inactive: v_old + (v - v_old) may differ from v by an ulp,
  # which made clip_frac count rounding noise (and differ between device layouts).
  v_clip = jnp.where(jnp.abs(v - v_old) <= clip_eps, v,
                     v_old + jnp.clip(v - v_old, -clip_eps, clip_eps))
  err_clip = jnp.square(v_clip - ret)
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clip), mask)
  aux = dict(clip_frac=masked_mean((err_clip > err).astype(jnp.float32), mask))
  return loss, jax.lax.stop_gradient(aux)


def entropy(logits: ArrayLike, mask: ArrayLike) -> Array:
  """Masked mean token entropy ``H = −Σ_v p_v log p_v`` of ``softmax(logits)``.

  ``-inf`` logits (top-k / top-p filtered) contribute 0, with finite gradients.

  Args:
    logits: ``[B, T, V]``.
    mask: ``[B, T]``, 1 = counted.

  Returns:
    Scalar float32 token-level masked mean entropy (nats); 0 if nothing is valid.
  """
  logits, mask = jnp.asarray(logits), jnp.asarray(mask)
  chex.assert_rank([logits, mask], [3, 2])
  chex.assert_equal_shape_prefix([logits, mask], 2)
  # A huge finite floor instead of -inf: p = 0 there and p·log p = 0·(−1e30) = 0, whereas
  # 0·(−inf) would be NaN in the value and in the gradient.
  z = jnp.maximum(f32(logits), -1e30)
  logp = jax.nn.log_softmax(z, axis=-1)
  h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return masked_mean(h, mask)


# --------------------------------------------------------------------- KL controllers


def adaptive_kl_update(kl_coef: ArrayLike, observed_kl: ArrayLike, n_steps: ArrayLike,
                       target: ArrayLike, horizon: ArrayLike) -> Array:
  """Adaptive KL coefficient, Ziegler et al. 2019 §2.2.

  ``e = clip(KL_observed / KL_target − 1, −0.2, 0.2)``, ``β ← β · (1 + e · n / horizon)``,
  where ``n`` is the number of samples (episodes) since the last update.

  Args:
    kl_coef: current β.
    observed_kl: measured KL(π ‖ π_ref) per sequence (mean over the batch).
    n_steps: samples since the last update.
    target: KL target (> 0).
    horizon: adaptation horizon in samples (> 0).

  Returns:
    The new β, float32 scalar.
  """
  e = jnp.clip(f32(observed_kl) / f32(target) - 1.0, -0.2, 0.2)
  return f32(kl_coef) * (1.0 + e * f32(n_steps) / f32(horizon))


class KLControllerState(NamedTuple):
  """State of a KL controller: an array-only pytree (jittable, checkpointable).

  Attributes:
    kl_coef: current β (float32 scalar).
    target: KL target (1 for a fixed controller; unused).
    horizon: horizon in samples (1 for a fixed controller; unused).
    adaptive: bool scalar; False = fixed β.
  """
  kl_coef: Array
  target: Array
  horizon: Array
  adaptive: Array


def kl_controller_init(kind: str, init_coef: float, target: float | None = None,
                       horizon: float | None = None) -> KLControllerState:
  """Creates a fixed or adaptive (Ziegler et al. 2019) KL controller state.

  Args:
    kind: ``"fixed"`` (InstructGPT: β = 0.02) or ``"adaptive"``.
    init_coef: initial β (≥ 0).
    target: KL target, required (> 0) for ``"adaptive"``.
    horizon: horizon in samples, required (> 0) for ``"adaptive"``.

  Returns:
    A ``KLControllerState``.

  Raises:
    ValueError: on an unknown ``kind`` or a missing / non-positive target or horizon.
  """
  if kind not in ("fixed", "adaptive"):
    raise ValueError(f"kl_controller_init: kind must be 'fixed' or 'adaptive', got {kind!r}")
  if not init_coef >= 0:
    raise ValueError(f"kl_controller_init: init_coef must be >= 0, got {init_coef}")
  adaptive = kind == "adaptive"
  if adaptive:
    for name, val in (("target", target), ("horizon", horizon)):
      if val is None or not val > 0:
        raise ValueError(f"kl_controller_init: adaptive controller needs {name} > 0, "
                         f"got {val}")
  else:
    target, horizon = 1.0, 1.0  # unused; 1 keeps the (discarded) adaptive branch finite
  return KLControllerState(
      kl_coef=jnp.float32(init_coef), target=jnp.float32(target),
      horizon=jnp.float32(horizon), adaptive=jnp.asarray(adaptive))


def kl_controller_update(state: KLControllerState, observed_kl: ArrayLike,
                         n_steps: ArrayLike) -> KLControllerState:
  """One controller step: fixed keeps β; adaptive applies ``adaptive_kl_update``.

  Args:
    state: a ``KLControllerState``.
    observed_kl: measured KL per sequence.
    n_steps: samples since the last update.

  Returns:
    The new state (same structure and dtypes).
  """
  new = adaptive_kl_update(state.kl_coef, observed_kl, n_steps, state.target, state.horizon)
  return state._replace(kl_coef=jnp.where(state.adaptive, new, state.kl_coef))
