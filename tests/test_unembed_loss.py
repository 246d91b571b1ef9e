"""`losses.sft_loss_from_hidden` against float64 numpy written from the formula.

loss = Σ m·(logsumexp(hW) − (hW)[target]) / Σ m; its gradients are
∂/∂logits = m·(softmax − onehot)/Σm, ∂/∂h = (∂/∂logits) Wᵀ, ∂/∂W = hᵀ (∂/∂logits).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax import losses


def reference(h, w, targets, mask):
  """(loss, dloss/dh, dloss/dW) in float64 numpy."""
  h, w = h.astype(np.float64), w.astype(np.float64)
  m = (mask != 0).astype(np.float64)
  logits = np.einsum("btd,dv->btv", h, w)
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  safe = np.where(m > 0, targets, 0)
  picked = np.take_along_axis(logits, safe[..., None], -1)[..., 0]
  count = m.sum()
  if count == 0:
    return 0.0, np.zeros_like(h), np.zeros_like(w)
  loss = ((lse - picked) * m).sum() / count
  soft = np.exp(logits - lse[..., None])
  onehot = np.eye(w.shape[1])[safe]
  dlogits = (soft - onehot) * m[..., None] / count
  return loss, np.einsum("btv,dv->btd", dlogits, w), np.einsum("btd,btv->dv", h, dlogits)


def inputs(seed, b=3, t=13, d=8, v=37):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = (rng.random((b, t)) < 0.7).astype(np.int32)
  mask[1] = 0                                   # a fully masked row
  targets[mask == 0] = -100                     # masked targets may be out of range
  return h, w, targets, mask


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_value_and_gradients_match_float64_formula(chunk):
  h, w, targets, mask = inputs(0)
  fn = jax.jit(jax.value_and_grad(
      lambda h_, w_: losses.sft_loss_from_hidden(h_, w_, targets, mask, chunk_size=chunk),
      argnums=(0, 1)))
  loss, (dh, dw) = fn(h, w)
  want, want_dh, want_dw = reference(h, w, targets, mask)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dh), want_dh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-4, atol=1e-6)
  # the plain call (no gradient) gives the same value
  np.testing.assert_allclose(float(losses.sft_loss_from_hidden(h, w, targets, mask, chunk)),
                             want, rtol=1e-5)


def test_equals_sft_loss_on_the_logits_and_scales_with_the_cotangent():
  h, w, targets, mask = inputs(1, t=20)

  def ours(h_, w_):
    return 3.0 * losses.sft_loss_from_hidden(h_, w_, targets, mask, chunk_size=6)

  def plain(h_, w_):
    return 3.0 * losses.sft_loss(jnp.einsum("btd,dv->btv", h_, w_), targets, mask)

  a, ga = jax.value_and_grad(ours, argnums=(0, 1))(h, w)
  b, gb = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_fully_masked_gives_zero_value_and_gradient():
  h, w, targets, _ = inputs(2)
  mask = np.zeros(targets.shape, np.int32)
  loss, (dh, dw) = jax.value_and_grad(
      lambda h_, w_: losses.sft_loss_from_hidden(h_, w_, targets, mask, 4), (0, 1))(h, w)
  assert float(loss) == 0.0
  assert not np.asarray(dh).any() and not np.asarray(dw).any()


def test_bfloat16_inputs():
  h, w, targets, mask = inputs(3)
  hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  loss, (dh, dw) = jax.value_and_grad(
      lambda h_, w_: losses.sft_loss_from_hidden(h_, w_, targets, mask, 4), (0, 1))(hb, wb)
  assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  want, want_dh, want_dw = reference(np.asarray(hb, np.float32), np.asarray(wb, np.float32),
                                     targets, mask)
  np.testing.assert_allclose(float(loss), want, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(dh, np.float32), want_dh, rtol=5e-2, atol=2e-3)
  np.testing.assert_allclose(np.asarray(dw, np.float32), want_dw, rtol=5e-2, atol=2e-3)
