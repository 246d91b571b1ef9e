"""What every loss module shares: float32 casts, mask handling and the safe division.

A fully masked batch gives a finite 0 for the value and the gradient: denominators are
guarded with a double ``where`` and masked entries are replaced by zeros before any
non-linearity, so garbage (even inf / NaN) in padded slots cannot leak.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = Any

# log-ratios are clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] before exp() (PPO ratio, k3):
# e^20 ~ 4.9e8 keeps products with advantages / coefficients far from float32 overflow
# (e^89 overflows) while every ratio PPO actually sees (|log ρ| << 1) is untouched.
# Beyond the clamp the value saturates and its gradient is 0 (jnp.clip's derivative).
MAX_LOG_RATIO = 20.0

# Whitening epsilon (added to the biased variance), as in Ziegler et al. 2019's code.
WHITEN_EPS = 1e-8




# --------------------------------------------------------------------------- helpers


def f32(x: ArrayLike) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def valid_mask(mask: ArrayLike) -> Array:
  """Boolean view of a mask (bool, int or float weights; nonzero = valid)."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def safe_div(num: Array, den: Array) -> Array:
  """num / den where den > 0, else 0 — with a finite gradient in both branches."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def zero_masked(x: Array, valid: Array) -> Array:
  """Replaces masked entries by 0 (a where, so inf/NaN there gets no gradient path)."""
  return jnp.where(valid, x, jnp.zeros_like(x))


def masked_sum(x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None
               ) -> Array:
  """Sum of ``x`` over valid entries: ``Σ x·m`` (float32).

  Args:
    x: array of any shape (float32 / bfloat16).
    mask: same shape as ``x``; bool / int / float weights (0 = masked).
    axis: axes to reduce; ``None`` reduces everything.

  Returns:
    ``Σ x·m`` over ``axis`` as float32. Masked entries contribute exactly 0 even if
    they hold inf / NaN.
  """
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  chex.assert_equal_shape([x, mask])
  m = f32(mask)
  return jnp.sum(zero_masked(f32(x), valid_mask(mask)) * m, axis=axis)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None
                ) -> Array:
  """Masked mean ``Σ x·m / Σ m`` (token-level over the whole batch when ``axis=None``).

  Args:
    x: array of any shape (float32 / bfloat16).
    mask: same shape as ``x``; bool / int / float weights (0 = masked).
    axis: axes to reduce; ``None`` reduces everything.

  Returns:
    float32 mean over ``axis``; 0 (with zero gradient) where ``Σ m = 0``.
  """
  x, mask = jnp.asarray(x), jnp.asarray(mask)
  chex.assert_equal_shape([x, mask])
  return safe_div(masked_sum(x, mask, axis), jnp.sum(f32(mask), axis=axis))


def masked_max(x: Array, valid: Array) -> Array:
  """Max over valid entries, 0 if none (for aux statistics only)."""
  neg = jnp.finfo(jnp.float32).min
  out = jnp.max(jnp.where(valid, x, neg))
  return jnp.where(jnp.any(valid), out, 0.0)
