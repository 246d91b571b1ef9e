"""The SFT / ptx loss straight from final hidden states, without [B, T, V] logits.

`losses.sft_loss(hidden @ W, targets, mask)` needs the float32 logits of every position at
once, and its gradient keeps them (or their softmax) alive until the backward pass: for a
128k vocabulary and 16k tokens that is 8.6 GB. Here the sequence is cut into chunks of
`chunk_size` positions and `lax.scan` handles one chunk at a time:

  logits_c = h_c W                   (float32, [B, c, V], freed after the chunk)
  nll      = logsumexp(logits_c) − logits_c[target]                      (per token)
  ∂loss/∂logits_c = m · (softmax(logits_c) − onehot(target)) / Σm
  ∂loss/∂h_c = (∂loss/∂logits_c) Wᵀ,    ∂loss/∂W += h_cᵀ (∂loss/∂logits_c)

The gradients are formed in the same pass as the loss (a `custom_vjp` whose forward rule
returns them as residuals), so the backward pass is a scale by the incoming cotangent: no
logits are recomputed and the FLOPs equal the unchunked loss's (one [D, V] matmul forward,
two backward). The plain (non-differentiated) call only computes the loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sft_loss_from_hidden(hidden, unembedding, targets, mask, chunk_size: int = 256):
  """Masked mean next-token NLL of `hidden @ unembedding` (= `losses.sft_loss` of those logits).

  Args:
    hidden: [B, T, D] final hidden states (float32 or bfloat16), aligned with `targets`
      (`hidden[:, t]` predicts `targets[:, t]`).
    unembedding: [D, V] the LM head (the embedding's transpose for tied models), in the
      compute dtype; products accumulate in float32.
    targets: [B, T] int token ids; ignored where `mask` is 0.
    mask: [B, T], nonzero = the token counts.
    chunk_size: at most this many positions per chunk (static; T is split into
      ceil(T / chunk_size) equal chunks); smaller = less memory, more loop steps.

  Returns:
    Scalar float32 loss; 0 (with zero gradients) when no token counts.
  """
  weights = (jnp.asarray(mask) != 0).astype(jnp.float32)
  count = jnp.sum(weights)
  safe_targets = jnp.where(weights > 0, targets, 0).astype(jnp.int32)
  total = _nll_sum(hidden, unembedding, safe_targets, weights, int(chunk_size))
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _chunk_len(t: int, chunk_size: int) -> int:
  """The chunk length: as few chunks as `chunk_size` allows, split evenly (padding < n)."""
  n = -(-t // max(1, min(chunk_size, t)))
  return -(-t // n)


def _to_chunks(x, chunk: int):
  """[B, T, ...] -> [n, B, chunk, ...], T zero-padded up to n * chunk."""
  b, t = x.shape[:2]
  n = -(-t // chunk)
  pad = [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad)
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def _from_chunks(x, t: int):
  """[n, B, chunk, ...] -> [B, T, ...] (drops the padding)."""
  n, b, chunk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * chunk) + x.shape[3:])[:, :t]


def _chunk_nll(h, w, tgt, wgt):
  """Summed weighted NLL of one chunk, and the float32 logits' lse for the gradient."""
  logits = jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - picked) * wgt), logits, lse


def _scan(hidden, w, targets, weights, chunk_size: int, with_grads: bool):
  t = hidden.shape[1]
  chunk = _chunk_len(t, chunk_size)
  xs = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(weights, chunk))

  def body(carry, x):
    total, dw = carry
    h, tgt, wgt = x
    nll, logits, lse = _chunk_nll(h, w, tgt, wgt)
    if not with_grads:
      return (total + nll, dw), None
    # d(Σ wgt·nll)/d logits = wgt · (softmax − onehot)
    dlogits = jnp.exp(logits - lse[..., None])
    dlogits = dlogits - jax.nn.one_hot(tgt, logits.shape[-1], dtype=jnp.float32)
    dlogits = dlogits * wgt[..., None]
    dh = jnp.einsum("BCV,DV->BCD", dlogits.astype(w.dtype), w,
                    preferred_element_type=jnp.float32).astype(hidden.dtype)
    dw = dw + jnp.einsum("BCD,BCV->DV", h, dlogits.astype(h.dtype),
                         preferred_element_type=jnp.float32)
    return (total + nll, dw), dh

  dw0 = jnp.zeros(w.shape, jnp.float32) if with_grads else jnp.zeros((), jnp.float32)
  (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), xs)
  if not with_grads:
    return total, None, None
  return total, _from_chunks(dh, t), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_sum(hidden, w, targets, weights, chunk):
  return _scan(hidden, w, targets, weights, chunk, with_grads=False)[0]


def _nll_sum_fwd(hidden, w, targets, weights, chunk):
  total, dh, dw = _scan(hidden, w, targets, weights, chunk, with_grads=True)
  return total, (dh, dw, targets, weights)


def _nll_sum_bwd(chunk, residuals, g):
  dh, dw, targets, weights = residuals
  del chunk
  # targets are ints (float0 cotangent); the weights are the mask, not trained
  return ((dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype),
          np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights))


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)
