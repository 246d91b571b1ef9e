"""Tests for rlhf_jax.losses.online (GRPO, Dr. GRPO, RLOO, REINFORCE++).

The float64 numpy references below are deliberately naive (explicit loops straight from
the papers' equations) and never call the code under test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import losses as L

# ------------------------------------------------------------ float64 numpy references


def np_grpo_advantages(scores, g, scale_by_std=True, eps=1e-6):
  """Shao et al. 2024 §4.1.2: (r_i − mean) / (std + eps), std with Bessel's correction."""
  scores = np.asarray(scores, np.float64)
  out = np.zeros_like(scores)
  for start in range(0, len(scores), g):
    grp = scores[start:start + g]
    mean = sum(grp) / g
    std = np.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
    for i, r in enumerate(grp):
      out[start + i] = (r - mean) / (std + eps) if scale_by_std else r - mean
  return out


def np_rloo_advantages(scores, k):
  """Ahmadian et al. 2024: A_i = r_i − 1/(k−1) Σ_{j≠i} r_j."""
  scores = np.asarray(scores, np.float64)
  out = np.zeros_like(scores)
  for start in range(0, len(scores), k):
    for i in range(k):
      others = [scores[start + j] for j in range(k) if j != i]
      out[start + i] = scores[start + i] - sum(others) / (k - 1)
  return out


def np_kl(lp, ref, kind):
  d = lp - ref
  return {"k1": d, "k2": d * d / 2, "k3": np.exp(-d) - 1 + d}[kind]


def np_reinforce_pp(scores, lp, ref, mask, beta, kind):
  """Hu 2025: A_t = score − β Σ_{s≥t} KL_s over valid tokens, then global-batch whitening."""
  lp, ref = np.asarray(lp, np.float64), np.asarray(ref, np.float64)
  adv = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    idx = list(np.nonzero(mask[b])[0])
    for n, t in enumerate(idx):
      adv[b, t] = scores[b] - beta * sum(np_kl(lp[b, s], ref[b, s], kind) for s in idx[n:])
  vals = [adv[b, t] for b, t in zip(*np.nonzero(mask))]
  if not vals:
    return adv
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased, as in whiten
  return np.where(mask > 0, (adv - mean) / np.sqrt(var + 1e-8), 0.0)


def np_grpo_loss(lp, old, ref, adv, mask, eps, beta, eps_high=None, length_norm="token"):
  """Shao et al. 2024 eq. 3 (negated), with eq. 4's D = π_ref/π − log(π_ref/π) − 1."""
  eps_high = eps if eps_high is None else eps_high
  lp, old, ref = (np.asarray(a, np.float64) for a in (lp, old, ref))
  adv = np.asarray(adv, np.float64)
  if adv.ndim == 1:
    adv = np.repeat(adv[:, None], mask.shape[1], axis=1)
  rows, total, count = [], 0.0, 0
  for b in range(mask.shape[0]):
    terms = []
    for t in range(mask.shape[1]):
      if mask[b, t]:
        rho = np.exp(lp[b, t] - old[b, t])
        a = adv[b, t]
        surrogate = min(rho * a, np.clip(rho, 1 - eps, 1 + eps_high) * a)
        q = np.exp(ref[b, t] - lp[b, t])  # π_ref / π
        kl = q - np.log(q) - 1
        terms.append(-(surrogate - beta * kl))
    total, count = total + sum(terms), count + len(terms)
    if terms:
      rows.append(sum(terms) / len(terms))
  if length_norm == "token":
    return total / count if count else 0.0
  return sum(rows) / len(rows) if rows else 0.0


# ------------------------------------------------------------------------- inputs


def ragged_mask(rng, b, t, holes=False):
  """Contiguous windows (left and right padding), one empty row, optionally holes."""
  m = np.zeros((b, t), np.float32)
  for i in range(b):
    n = 0 if i == 1 else rng.integers(1, t + 1)
    start = rng.integers(0, t - n + 1)
    m[i, start:start + n] = 1
  if holes:
    m *= rng.random((b, t)) > 0.25
    m[0, 0] = 1
  return m


def policy_inputs(rng, b, t, gap=0.3):
  lp = (rng.normal(size=(b, t)) * 0.5 - 2).astype(np.float32)
  old = (lp + rng.normal(size=(b, t)) * gap).astype(np.float32)
  ref = (lp + rng.normal(size=(b, t)) * gap).astype(np.float32)
  return lp, old, ref


def assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), leaf


B, T, G = 6, 5, 3
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------- group advantages


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("g", [2, 3, 6])
def test_grpo_advantages(rng, scale_by_std, g):
  scores = (rng.normal(size=B) * 2 + 1).astype(np.float32)
  fn = jax.jit(L.grpo_advantages, static_argnums=(1, 2))
  np.testing.assert_allclose(fn(scores, g, scale_by_std),
                             np_grpo_advantages(scores, g, scale_by_std), **TOL)


def test_grpo_advantages_unbiased_std_and_eps(rng):
  # G = 2 pins the convention: ±1/√2 with the unbiased std, ±1 with the biased one.
  np.testing.assert_allclose(L.grpo_advantages(np.array([0.0, 2.0]), 2, eps=0.0),
                             [-2 ** -0.5, 2 ** -0.5], rtol=1e-6)
  scores = rng.normal(size=B).astype(np.float32)
  np.testing.assert_allclose(L.grpo_advantages(scores, G, eps=0.5),
                             np_grpo_advantages(scores, G, eps=0.5), **TOL)


def test_grpo_advantages_gradient_finite_for_identical_group():
  g = jax.grad(lambda s: jnp.sum(L.grpo_advantages(s, 3) ** 2))(jnp.ones(3))
  assert_finite(g)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_rloo_advantages(rng, k):
  scores = (rng.normal(size=B) * 2 + 1).astype(np.float32)
  out = jax.jit(L.rloo_advantages, static_argnums=1)(scores, k)
  np.testing.assert_allclose(out, np_rloo_advantages(scores, k), **TOL)


@pytest.mark.parametrize("fn", [L.grpo_advantages, L.rloo_advantages])
def test_group_size_errors(fn):
  with pytest.raises(ValueError, match="multiple of group_size"):
    fn(jnp.zeros(7), 3)
  with pytest.raises(ValueError, match="group_size must be >= 2"):
    fn(jnp.zeros(4), 1)
  with pytest.raises(TypeError):
    fn(jnp.zeros(4), 2.0)  # a float is not a static group size


_group_fns = [functools.partial(L.grpo_advantages, scale_by_std=True),
              functools.partial(L.grpo_advantages, scale_by_std=False), L.rloo_advantages]


@settings(max_examples=30, deadline=None)
@given(value=st.floats(-1e4, 1e4, width=32), g=st.integers(2, 5), n=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_identical_group_scores_give_zero_advantage(value, g, n, seed):
  """A group whose samples all score the same carries no signal: exactly 0."""
  rng = np.random.default_rng(seed)
  scores = (rng.normal(size=n * g) * 3).astype(np.float32)
  scores[:g] = value  # the first group is constant, the others are not
  for fn in _group_fns:
    out = np.asarray(fn(scores, g))
    np.testing.assert_array_equal(out[:g], 0.0)
    assert np.all(np.isfinite(out))


@settings(max_examples=30, deadline=None)
@given(g=st.integers(2, 6), n=st.integers(1, 3), scale=st.floats(1e-2, 1e3),
       seed=st.integers(0, 2 ** 16))
def test_group_advantage_properties(g, n, scale, seed):
  rng = np.random.default_rng(seed)
  scores = (rng.normal(size=n * g) * scale + rng.normal() * scale).astype(np.float32)
  rloo = np.asarray(L.rloo_advantages(scores, g), np.float64).reshape(n, g)
  # RLOO advantages sum to zero within every group.
  np.testing.assert_allclose(rloo.sum(1), 0.0, atol=1e-5 * scale * g)
  # ... and are k/(k−1) times the mean-centred (Dr. GRPO) advantages.
  dr = np.asarray(L.grpo_advantages(scores, g, scale_by_std=False), np.float64)
  np.testing.assert_allclose(rloo, dr.reshape(n, g) * g / (g - 1), rtol=1e-4,
                             atol=1e-5 * scale)
  # GRPO: zero group mean, unbiased std s / (s + eps) (≈ 1 unless a group is ~constant).
  grpo = np.asarray(L.grpo_advantages(scores, g), np.float64).reshape(n, g)
  s = scores.astype(np.float64).reshape(n, g).std(1, ddof=1)
  np.testing.assert_allclose(grpo.mean(1), 0.0, atol=1e-4)
  np.testing.assert_allclose(grpo.std(1, ddof=1), s / (s + 1e-6), rtol=1e-3)


# ---------------------------------------------------------------------- REINFORCE++


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("holes", [False, True])
def test_reinforce_pp_advantages(rng, kind, holes):
  lp, _, ref = policy_inputs(rng, B, T)
  m = ragged_mask(rng, B, T, holes=holes)
  scores = rng.normal(size=B).astype(np.float32)
  ref_out = np_reinforce_pp(scores, lp, ref, m, 0.1, kind)
  ref[m == 0] = -np.inf  # padded reference log-probs must not leak
  fn = jax.jit(L.reinforce_pp_advantages, static_argnames="kind")
  out = fn(scores, lp, ref, m, 0.1, kind=kind)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(out)[m == 0] == 0)
  # Whitened over the global batch: zero mean, unit (biased) std over the valid tokens.
  vals = np.asarray(out)[m > 0]
  np.testing.assert_allclose([vals.mean(), vals.std()], [0.0, 1.0], atol=1e-4)
  g = jax.grad(lambda lp: jnp.sum(fn(scores, lp, ref, m, 0.1, kind=kind) ** 3))(lp)
  assert_finite(g)


def test_reinforce_pp_fully_masked_is_zero(rng):
  lp, _, ref = policy_inputs(rng, B, T)
  m = np.zeros((B, T), np.float32)
  fn = lambda s, lp, ref: L.reinforce_pp_advantages(s, lp, ref, m, 0.1).sum()
  val, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(np.ones(B, np.float32), lp, ref)
  assert float(val) == 0.0
  for gr in grads:
    np.testing.assert_array_equal(gr, np.zeros_like(gr))


# ------------------------------------------------------------------- GRPO policy loss


@pytest.mark.parametrize("length_norm", ["token", "sequence"])
@pytest.mark.parametrize("adv_rank,eps_high", [(1, None), (2, None), (1, 0.28)])
def test_grpo_policy_loss(rng, length_norm, adv_rank, eps_high):
  lp, old, ref = policy_inputs(rng, B, T)
  adv = rng.normal(size=(B,) if adv_rank == 1 else (B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  fn = jax.jit(functools.partial(L.grpo_policy_loss, clip_eps=0.2, kl_coef=0.04,
                                 clip_eps_high=eps_high, length_norm=length_norm))
  loss, aux = fn(lp, old, ref, adv, m)
  want = np_grpo_loss(lp, old, ref, adv, m, 0.2, 0.04, eps_high, length_norm)
  np.testing.assert_allclose(loss, want, **TOL)
  # The two aux parts add up to the loss; kl is the mean k3 with the same aggregation.
  np.testing.assert_allclose(aux["pg_loss"] + 0.04 * aux["kl"], loss, **TOL)
  kl_ref = np_grpo_loss(lp, lp, ref, np.zeros(B), m, 0.2, 1.0, None, length_norm)
  np.testing.assert_allclose(aux["kl"], kl_ref, **TOL)
  assert 0 < float(aux["clip_frac"]) < 1  # both branches exercised


@pytest.mark.parametrize("length_norm", ["token", "sequence"])
def test_grpo_policy_loss_gradient_matches_finite_differences(rng, length_norm):
  lp, old, ref = policy_inputs(rng, B, T)
  adv = rng.normal(size=B).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  grad = jax.jit(jax.grad(lambda x: L.grpo_policy_loss(
      x, old, ref, adv, m, 0.2, 0.5, length_norm=length_norm)[0]))(lp)
  h, fd = 1e-6, np.zeros(lp.shape)
  for i in np.ndindex(lp.shape):
    up, dn = lp.astype(np.float64), lp.astype(np.float64)
    up[i] += h
    dn[i] -= h
    fd[i] = (np_grpo_loss(up, old, ref, adv, m, 0.2, 0.5, None, length_norm)
             - np_grpo_loss(dn, old, ref, adv, m, 0.2, 0.5, None, length_norm)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[m == 0] == 0)


def test_grpo_policy_loss_on_policy_is_vanilla_policy_gradient(rng):
  """ρ = 1 and π = π_ref: the loss is −mean(A) and its gradient −A·m/Σm."""
  lp, _, _ = policy_inputs(rng, B, T)
  adv = rng.normal(size=B).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  (loss, aux), g = jax.value_and_grad(L.grpo_policy_loss, has_aux=True)(
      lp, lp, lp, adv, m, 0.2, 0.04)
  a = np.repeat(adv[:, None], T, axis=1)
  np.testing.assert_allclose(loss, -(a * m).sum() / m.sum(), **TOL)
  np.testing.assert_allclose(g, -a * m / m.sum(), **TOL)
  assert aux["kl"] == 0 and aux["clip_frac"] == 0


def test_grpo_policy_loss_sequence_equals_token_for_equal_lengths(rng):
  lp, old, ref = policy_inputs(rng, B, T)
  adv = rng.normal(size=B).astype(np.float32)
  m = np.ones((B, T), np.float32)
  tok, _ = L.grpo_policy_loss(lp, old, ref, adv, m, 0.2, 0.04)
  seq, _ = L.grpo_policy_loss(lp, old, ref, adv, m, 0.2, 0.04, length_norm="sequence")
  np.testing.assert_allclose(seq, tok, rtol=1e-6)


@pytest.mark.parametrize("length_norm", ["token", "sequence"])
def test_grpo_policy_loss_masking(rng, length_norm):
  lp, old, ref = policy_inputs(rng, B, T)
  adv = rng.normal(size=B).astype(np.float32)
  call = lambda m: jax.jit(jax.value_and_grad(
      lambda a, b, c: L.grpo_policy_loss(a, b, c, adv, m, 0.2, 0.04,
                                         length_norm=length_norm)[0],
      argnums=(0, 1, 2)))
  # Fully masked: finite 0 value and gradient.
  m0 = np.zeros((B, T), np.float32)
  val, grads = call(m0)(lp, old, ref)
  assert float(val) == 0.0
  for gr in grads:
    np.testing.assert_array_equal(gr, np.zeros_like(gr))
  # Garbage (inf / NaN / -inf) in padded slots changes nothing.
  m = ragged_mask(rng, B, T, holes=True)
  clean, _ = call(m)(lp, old, ref)
  garbage = lambda x: np.where(m == 0, rng.choice([np.nan, np.inf, -np.inf], x.shape),
                               x).astype(np.float32)
  dirty, grads = call(m)(garbage(lp), garbage(old), garbage(ref))
  np.testing.assert_allclose(dirty, clean, rtol=1e-6)
  assert_finite(grads)


def test_grpo_policy_loss_extreme_and_bfloat16(rng):
  lp, old, ref = policy_inputs(rng, B, T, gap=50.0)  # log-ratios of ~50: clamped, finite
  adv = (rng.normal(size=B) * 1e4).astype(np.float32)
  m = ragged_mask(rng, B, T)
  val, g = jax.value_and_grad(lambda x: L.grpo_policy_loss(x, old, ref, adv, m, 0.2,
                                                           0.04)[0])(lp)
  assert np.isfinite(float(val))
  assert_finite(g)
  lp, old, ref = (jnp.asarray(x, jnp.bfloat16) for x in policy_inputs(rng, B, T))
  l16, _ = L.grpo_policy_loss(lp, old, ref, adv, m, 0.2, 0.04)
  l32, _ = L.grpo_policy_loss(*(np.asarray(x, np.float32) for x in (lp, old, ref)), adv,
                              m, 0.2, 0.04)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, rtol=1e-5)


def test_grpo_policy_loss_argument_errors():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="length_norm"):
    L.grpo_policy_loss(z, z, z, jnp.zeros(2), jnp.ones((2, 3)), 0.2, 0.04,
                       length_norm="group")
  with pytest.raises(AssertionError):
    L.grpo_policy_loss(z, z, z, jnp.zeros(3), jnp.ones((2, 3)), 0.2, 0.04)


def test_grpo_pipeline_jits_end_to_end(rng):
  """Advantages and loss in one jitted step, β traced (e.g. from a controller)."""
  lp, old, ref = policy_inputs(rng, B, T)
  m = ragged_mask(rng, B, T)
  scores = rng.normal(size=B).astype(np.float32)

  @jax.jit
  def step(lp, beta):
    adv = L.grpo_advantages(scores, G)
    return L.grpo_policy_loss(lp, old, ref, adv, m, 0.2, beta)[0]

  want = np_grpo_loss(lp, old, ref, np_grpo_advantages(scores, G), m, 0.2, 0.04)
  np.testing.assert_allclose(step(lp, jnp.float32(0.04)), want, **TOL)
