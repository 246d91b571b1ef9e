"""Tests for rlhf_jax.losses.preference (DPO, cDPO, IPO, Plackett–Luce DPO).

The float64 numpy references below are deliberately naive (explicit loops straight from
the papers' equations) and never call the code under test.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import losses as L

# ------------------------------------------------------------ float64 numpy references


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, label_smoothing=0.0, loss_type="sigmoid"):
  """Rafailov et al. 2023 eq. 7 (with cDPO smoothing) / Azar et al. 2023 eq. 17."""
  losses, acc = [], []
  for i in range(len(pc)):
    h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
    if loss_type == "sigmoid":
      losses.append(-(1 - label_smoothing) * np_log_sigmoid(beta * h)
                    - label_smoothing * np_log_sigmoid(-beta * h))
    else:
      losses.append((h - 1 / (2 * beta)) ** 2)
    acc.append(h > 0)
  return (np.mean(losses) if losses else 0.0), (np.mean(acc) if acc else 0.0)


def np_pl_dpo(policy, ref, ranks, valid, beta):
  """Plackett–Luce DPO with Breslow ties; the last (worst) group is skipped.

  Stages are the distinct ranks in order; each item of a stage's group scores
  u_i − log Σ_{j: rank_j ≥ rank_i} e^{u_j}. Returns (loss, accuracy, num_pairs, num_prompts).
  """
  per_prompt, n_pairs, n_correct = [], 0, 0
  for b in range(policy.shape[0]):
    items = [k for k in range(policy.shape[1]) if valid[b, k]]
    u = {k: beta * (float(policy[b, k]) - float(ref[b, k])) for k in items}
    levels = sorted({ranks[b, k] for k in items})
    nll = 0.0
    for level in levels[:-1]:
      risk = [j for j in items if ranks[b, j] >= level]
      denom = sum(np.exp(u[j]) for j in risk)
      for i in items:
        if ranks[b, i] == level:
          nll -= u[i] - np.log(denom)
    if len(levels) >= 2:
      per_prompt.append(nll)
    for w in items:
      for l in items:
        if ranks[b, w] < ranks[b, l]:
          n_pairs += 1
          n_correct += u[w] > u[l]
  loss = np.mean(per_prompt) if per_prompt else 0.0
  return loss, (n_correct / n_pairs if n_pairs else 0.0), n_pairs, len(per_prompt)


def np_pl_strict(policy, ref, order, beta):
  """App. A.3 for one strict ranking τ: −log Π_k e^{u_τ(k)} / Σ_{j≥k} e^{u_τ(j)}."""
  u = [beta * (float(policy[k]) - float(ref[k])) for k in order]
  return -sum(u[k] - np.log(sum(np.exp(u[j]) for j in range(k, len(u))))
              for k in range(len(u)))


# ------------------------------------------------------------------------- inputs


def assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), leaf


def pairs(rng, b, scale=5.0):
  """Sequence log-probs (sums over tokens: tens of nats) for chosen/rejected pairs."""
  return [(rng.normal(size=b) * scale - 40).astype(np.float32) for _ in range(4)]


def rankings(rng, b, k, scale=5.0):
  policy = (rng.normal(size=(b, k)) * scale - 40).astype(np.float32)
  ref = (policy + rng.normal(size=(b, k)) * scale).astype(np.float32)
  ranks = rng.integers(0, k - 1, size=(b, k))  # k-1 values over k slots: ties exist
  valid = np.zeros((b, k), np.float32)
  for i in range(b):
    valid[i, :rng.integers(2, k + 1)] = 1
  valid[1, 1:] = 0  # one prompt with a single response: contributes nothing
  return policy, ref, ranks, valid


B, K, BETA = 5, 5, 0.1
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ---------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1),
                                                 ("ipo", 0.0)])
def test_dpo_loss(rng, loss_type, smoothing):
  pc, pr, rc, rr = pairs(rng, B)
  fn = jax.jit(functools.partial(L.dpo_loss, label_smoothing=smoothing,
                                 loss_type=loss_type))
  loss, aux = fn(pc, pr, rc, rr, BETA)
  want, acc = np_dpo(pc, pr, rc, rr, BETA, smoothing, loss_type)
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(aux["accuracy"], acc)
  chosen = BETA * (pc.astype(np.float64) - rc)
  rejected = BETA * (pr.astype(np.float64) - rr)
  np.testing.assert_allclose(aux["chosen_rewards"], chosen.mean(), **TOL)
  np.testing.assert_allclose(aux["rejected_rewards"], rejected.mean(), **TOL)
  np.testing.assert_allclose(aux["margin"], (chosen - rejected).mean(), **TOL)
  assert aux["num_pairs"] == B


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                 ("ipo", 0.0)])
def test_dpo_gradient_closed_form(rng, loss_type, smoothing):
  pc, pr, rc, rr = pairs(rng, B)
  grads = jax.grad(lambda *a: L.dpo_loss(*a, BETA, smoothing, loss_type)[0],
                   argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
  sig = lambda x: 1 / (1 + np.exp(-x))
  if loss_type == "sigmoid":  # d/dh of −(1−ε) log σ(βh) − ε log σ(−βh)
    dh = -BETA * ((1 - smoothing) * sig(-BETA * h) - smoothing * sig(BETA * h))
  else:                       # d/dh of (h − 1/(2β))²
    dh = 2 * (h - 1 / (2 * BETA))
  for g, sign in zip(grads, (1, -1, -1, 1)):
    np.testing.assert_allclose(g, sign * dh / B, rtol=1e-4, atol=1e-7)


def test_ipo_minimum_is_at_half_inverse_beta():
  """IPO regresses h onto 1/(2β): zero loss there, positive on either side."""
  beta = 0.25
  for h, positive in [(2.0, False), (1.0, True), (3.0, True)]:
    loss, _ = L.dpo_loss(jnp.array([h]), jnp.array([0.0]), jnp.array([0.0]),
                         jnp.array([0.0]), beta, loss_type="ipo")
    assert (float(loss) > 0) == positive
  np.testing.assert_allclose(loss, 1.0)


def test_dpo_empty_batch_and_extremes():
  z = np.zeros(0, np.float32)
  (loss, aux), grads = jax.value_and_grad(L.dpo_loss, argnums=(0, 1, 2, 3), has_aux=True)(
      z, z, z, z, BETA)
  assert float(loss) == 0.0 and float(aux["accuracy"]) == 0.0
  assert all(g.shape == (0,) for g in grads)
  big = np.array([1e4, -1e4], np.float32)  # log-ratio gaps of 1e4: log σ stays finite
  val, g = jax.value_and_grad(lambda x: L.dpo_loss(x, -x, 0 * x, 0 * x, 1.0)[0])(big)
  assert np.isfinite(float(val))
  assert_finite(g)


def test_dpo_bfloat16_matches_float32(rng):
  a16 = [jnp.asarray(x, jnp.bfloat16) for x in pairs(rng, B)]
  l16, _ = L.dpo_loss(*a16, BETA)
  l32, _ = L.dpo_loss(*(np.asarray(x, np.float32) for x in a16), BETA)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, rtol=1e-6)


def test_dpo_argument_errors():
  z = jnp.zeros(2)
  with pytest.raises(ValueError, match="loss_type"):
    L.dpo_loss(z, z, z, z, BETA, loss_type="hinge")
  with pytest.raises(ValueError, match="beta"):
    L.dpo_loss(z, z, z, z, 0.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    L.dpo_loss(z, z, z, z, BETA, label_smoothing=0.5)
  with pytest.raises(ValueError, match="IPO"):
    L.dpo_loss(z, z, z, z, BETA, label_smoothing=0.1, loss_type="ipo")
  with pytest.raises(AssertionError):
    L.dpo_loss(z, z, z, jnp.zeros(3), BETA)


# ------------------------------------------------------------ Plackett–Luce DPO


_pl_jit = jax.jit(L.plackett_luce_dpo_loss)


def test_plackett_luce_dpo_loss(rng):
  policy, ref, ranks, valid = rankings(rng, B, K)
  want, acc, n_pairs, n_prompts = np_pl_dpo(policy, ref, ranks, valid, BETA)
  assert n_prompts < B  # some prompt does not contribute: the mean skips it
  policy[valid == 0], ref[valid == 0] = np.nan, -np.inf  # garbage must not leak
  fn = jax.jit(jax.value_and_grad(L.plackett_luce_dpo_loss, argnums=(0, 1), has_aux=True))
  (loss, aux), grads = fn(policy, ref, ranks, valid, BETA)
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(aux["accuracy"], acc, **TOL)
  assert aux["num_pairs"] == n_pairs and aux["num_prompts"] == n_prompts
  assert_finite(grads)
  assert np.all(np.asarray(grads[0])[valid == 0] == 0)


def test_plackett_luce_strict_ranking_is_appendix_a3(rng):
  """Distinct ranks: exactly the PL likelihood of App. A.3 (last stage included: 0)."""
  policy, ref, _, _ = rankings(rng, B, K)
  ranks = np.stack([rng.permutation(K) for _ in range(B)])
  loss, _ = _pl_jit(policy, ref, ranks, np.ones((B, K)), BETA)
  want = np.mean([np_pl_strict(policy[b], ref[b], np.argsort(ranks[b]), BETA)
                  for b in range(B)])
  np.testing.assert_allclose(loss, want, **TOL)


def test_plackett_luce_ties_breslow_examples():
  """Hand-checked tie cases: a tied top pair, and a tied last pair (skipped)."""
  u = np.array([[0.3, -0.2, 0.5]])
  ref = np.zeros_like(u, np.float32)
  top, _ = L.plackett_luce_dpo_loss(u, ref, np.array([[0, 0, 1]]), np.ones((1, 3)), 1.0)
  lse = np.log(np.exp(u).sum())
  np.testing.assert_allclose(top, 2 * lse - u[0, 0] - u[0, 1], rtol=1e-6)
  last, _ = L.plackett_luce_dpo_loss(u, ref, np.array([[0, 1, 1]]), np.ones((1, 3)), 1.0)
  np.testing.assert_allclose(last, lse - u[0, 0], rtol=1e-6)  # only the winner's stage


def test_plackett_luce_gradient_matches_finite_differences(rng):
  policy, ref, ranks, valid = rankings(rng, B, K, scale=3.0)
  grad = jax.jit(jax.grad(lambda p: L.plackett_luce_dpo_loss(p, ref, ranks, valid,
                                                             BETA)[0]))(policy)
  h, fd = 1e-5, np.zeros(policy.shape)
  for i in np.ndindex(policy.shape):
    up, dn = policy.astype(np.float64), policy.astype(np.float64)
    up[i] += h
    dn[i] -= h
    fd[i] = (np_pl_dpo(up, ref, ranks, valid, BETA)[0]
             - np_pl_dpo(dn, ref, ranks, valid, BETA)[0]) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(grad)[valid == 0] == 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), scale=st.floats(0.1, 200.0))
def test_plackett_luce_k2_is_pairwise_dpo(seed, scale):
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = pairs(rng, 4, scale)
  swap = rng.random(4) > 0.5  # the chosen response sits in either slot
  stack = lambda c, r: np.where(swap[:, None], np.stack([r, c], 1), np.stack([c, r], 1))
  ranks = np.where(swap[:, None], [[1, 0]], [[0, 1]])
  loss_pl, aux_pl = _pl_jit(stack(pc, pr), stack(rc, rr), ranks, np.ones((4, 2)), BETA)
  loss_dpo, aux_dpo = L.dpo_loss(pc, pr, rc, rr, BETA)
  np.testing.assert_allclose(loss_pl, loss_dpo, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_pl["accuracy"], aux_dpo["accuracy"])
  np.testing.assert_allclose(aux_pl["margin"], aux_dpo["margin"], rtol=1e-5, atol=1e-6)
  # Tied pairs contribute nothing: the loss is the mean over the untied prompts only.
  tied = ranks.copy()
  tied[:2] = 0
  loss_t, aux_t = _pl_jit(stack(pc, pr), stack(rc, rr), tied, np.ones((4, 2)), BETA)
  loss_2, _ = L.dpo_loss(pc[2:], pr[2:], rc[2:], rr[2:], BETA)
  np.testing.assert_allclose(loss_t, loss_2, rtol=1e-5, atol=1e-6)
  assert aux_t["num_prompts"] == 2


@settings(max_examples=25, deadline=None)
@given(perms=st.lists(st.permutations(range(K)), min_size=3, max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_plackett_luce_permutation_invariant(perms, seed):
  policy, ref, ranks, valid = rankings(np.random.default_rng(seed), 3, K)
  take = functools.partial(np.take_along_axis, indices=np.array(perms), axis=1)
  loss, aux = _pl_jit(policy, ref, ranks, valid, BETA)
  loss_p, aux_p = _pl_jit(take(policy), take(ref), take(ranks), take(valid), BETA)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6, atol=1e-6)
  for key in aux:
    np.testing.assert_allclose(aux_p[key], aux[key], rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(2, 6), seed=st.integers(0, 2 ** 16))
def test_plackett_luce_random_sizes(b, k, seed):
  """b prompts with up to k responses, padded into one [3, 6] shape (one compile)."""
  rng = np.random.default_rng(seed)
  policy = (rng.normal(size=(3, 6)) * 10 - 30).astype(np.float32)
  ref = (rng.normal(size=(3, 6)) * 10 - 30).astype(np.float32)
  ranks = rng.integers(0, k, size=(3, 6))
  valid = np.zeros((3, 6), bool)
  valid[:b, :k] = rng.random((b, k)) > 0.2
  loss, aux = _pl_jit(policy, ref, ranks, valid, BETA)
  want, acc, n_pairs, n_prompts = np_pl_dpo(policy, ref, ranks, valid, BETA)
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(aux["accuracy"], acc, **TOL)
  assert aux["num_pairs"] == n_pairs and aux["num_prompts"] == n_prompts


def test_plackett_luce_fully_invalid_is_finite_zero(rng):
  policy, ref, ranks, _ = rankings(rng, B, K)
  fn = jax.jit(jax.value_and_grad(L.plackett_luce_dpo_loss, argnums=(0, 1), has_aux=True))
  for valid in (np.zeros((B, K)), np.eye(B, K)):  # nothing / one item per prompt
    (loss, aux), grads = fn(policy, ref, ranks, valid, BETA)
    assert float(loss) == 0.0 and aux["num_prompts"] == 0
    for g in grads:
      np.testing.assert_array_equal(g, np.zeros_like(g))
  # All tied: every prompt is one (last) group, so again nothing contributes.
  loss, aux = L.plackett_luce_dpo_loss(policy, ref, np.zeros((B, K)), np.ones((B, K)), BETA)
  assert float(loss) == 0.0 and aux["num_prompts"] == 0


def test_plackett_luce_extremes_and_bfloat16(rng):
  policy, ref, ranks, valid = rankings(rng, B, K, scale=1e4)
  (val, _), grads = jax.value_and_grad(L.plackett_luce_dpo_loss, argnums=(0, 1),
                                       has_aux=True)(policy, ref, ranks, valid, 1.0)
  assert np.isfinite(float(val))
  assert_finite(grads)
  p16, r16 = (jnp.asarray(x, jnp.bfloat16) for x in rankings(rng, B, K)[:2])
  l16, _ = L.plackett_luce_dpo_loss(p16, r16, ranks, valid, BETA)
  l32, _ = L.plackett_luce_dpo_loss(np.asarray(p16, np.float32), np.asarray(r16, np.float32),
                                    ranks, valid, BETA)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, rtol=1e-6)
  with pytest.raises(ValueError, match="beta"):
    L.plackett_luce_dpo_loss(policy, ref, ranks, valid, -1.0)


def test_plackett_luce_breslow_vs_exact_tie_likelihood():
  """Sanity link to the exact (Kalbfleisch–Prentice) likelihood: sum over linear
  extensions equals the plain PL term when no ties, and is ≥ Breslow's with ties
  (Breslow's denominators never shrink, so its likelihood is smaller)."""
  u = np.array([0.7, -0.4, 0.1, 1.2])
  zero = np.zeros((1, 4))

  def exact_nll(ranks):
    total = 0.0
    for order in itertools.permutations(range(4)):
      if all(ranks[order[a]] <= ranks[order[a + 1]] for a in range(3)):
        total += np.exp(-np_pl_strict(u, np.zeros(4), order, 1.0))
    return -np.log(total)

  for ranks in ([0, 1, 2, 3], [3, 0, 2, 1], [0, 0, 1, 2], [1, 0, 0, 2]):
    got, _ = L.plackett_luce_dpo_loss(u[None], zero, np.array([ranks]), np.ones((1, 4)), 1.0)
    if len(set(ranks)) == 4:
      np.testing.assert_allclose(got, exact_nll(ranks), rtol=1e-6)
    else:
      assert float(got) >= exact_nll(ranks) - 1e-6
