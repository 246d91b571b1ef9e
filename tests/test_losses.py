"""Tests for rlhf_jax.losses against float64 numpy references written from the formulas.

The references below are deliberately naive (explicit loops / sums straight from the
papers' equations) and never call the code under test.
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


def np_masked_mean(x, m, axis=None):
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  num, den = (x * m).sum(axis=axis), m.sum(axis=axis)
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  mx = z.max(-1, keepdims=True)
  return z - mx - np.log(np.exp(z - mx).sum(-1, keepdims=True))


def np_sft(logits, targets, mask):
  logp = np_log_softmax(logits)
  total, count = 0.0, 0.0
  for b in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      if mask[b, t]:
        total += -logp[b, t, targets[b, t]]
        count += 1
  return total / count if count else 0.0


def np_neg_log_sigmoid(x):
  return np.logaddexp(0.0, -np.asarray(x, np.float64))  # −log σ(x), stable


def np_ranking(rewards, ranks, valid):
  """InstructGPT eq. 1: per-prompt mean over pairs, then mean over prompts with pairs."""
  rewards = np.asarray(rewards, np.float64)
  per_prompt, n_correct, n_pairs = [], 0, 0
  for b in range(rewards.shape[0]):
    terms = []
    for w in range(rewards.shape[1]):
      for l in range(rewards.shape[1]):
        if valid[b, w] and valid[b, l] and ranks[b, w] < ranks[b, l]:
          d = rewards[b, w] - rewards[b, l]
          terms.append(np_neg_log_sigmoid(d))
          n_correct += d > 0
          n_pairs += 1
    if terms:
      per_prompt.append(np.mean(terms))
  loss = np.mean(per_prompt) if per_prompt else 0.0
  return loss, (n_correct / n_pairs if n_pairs else 0.0), n_pairs, len(per_prompt)


def np_pairwise(chosen, rejected, margin=0.0):
  d = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
  return np_neg_log_sigmoid(d - margin).mean(), (d > 0).mean()


def np_kl(lp, ref, kind):
  d = np.asarray(lp, np.float64) - np.asarray(ref, np.float64)
  return {"k1": d, "k2": d ** 2 / 2, "k3": np.exp(-d) - 1 + d}[kind]


def np_kl_rewards(scores, lp, ref, mask, beta, kind):
  out = np.where(mask > 0, -beta * np_kl(np.where(mask > 0, lp, 0), np.where(mask > 0, ref, 0),
                                         kind), 0.0)
  for b in range(mask.shape[0]):
    idx = np.nonzero(mask[b])[0]
    if len(idx):
      out[b, idx[-1]] += scores[b]
  return out


def np_gae(rewards, values, mask, gamma, lam):
  """GAE eq. 16, A_t = Σ_l (γλ)^l δ_{t+l}, over a row's valid tokens (next = next valid)."""
  rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.nonzero(mask[b])[0]
    v = [values[b, t] for t in idx] + [0.0]  # terminal after the last valid token
    deltas = [rewards[b, t] + gamma * v[i + 1] - v[i] for i, t in enumerate(idx)]
    for i, t in enumerate(idx):
      adv[b, t] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(idx) - i))
  return adv, np.where(mask > 0, adv + values, 0.0)


def np_whiten(x, mask, shift_mean=True):
  x = np.asarray(x, np.float64)
  vals = x[mask > 0]
  mean = vals.mean() if vals.size else 0.0
  var = ((vals - mean) ** 2).mean() if vals.size else 0.0
  y = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  return np.where(mask > 0, y, 0.0)


def np_ppo_policy(lp, old, adv, mask, eps, eps_high=None, dual=None):
  eps_high = eps if eps_high is None else eps_high
  lr = np.asarray(lp, np.float64) - np.asarray(old, np.float64)
  a = np.asarray(adv, np.float64)
  ratio = np.exp(lr)
  pg1, pg2 = -a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps_high)
  pg = np.maximum(pg1, pg2)
  if dual is not None:
    pg = np.where(a < 0, np.minimum(pg, -dual * a), pg)
  return (np_masked_mean(pg, mask), np_masked_mean(pg2 > pg1, mask),
          np_masked_mean(-lr, mask), np_masked_mean(lr ** 2 / 2, mask),
          np_masked_mean(ratio, mask), ratio[mask > 0].max())


def np_ppo_value(v, v_old, ret, mask, eps):
  v, v_old, ret = (np.asarray(a, np.float64) for a in (v, v_old, ret))
  v_clip = v_old + np.clip(v - v_old, -eps, eps)
  e1, e2 = (v - ret) ** 2, (v_clip - ret) ** 2
  return 0.5 * np_masked_mean(np.maximum(e1, e2), mask), np_masked_mean(e2 > e1, mask)


def np_entropy(logits, mask):
  logp = np_log_softmax(logits)
  return np_masked_mean(-(np.exp(logp) * logp).sum(-1), mask)


def np_adaptive_kl(beta, kl, n, target, horizon):
  e = min(max(kl / target - 1, -0.2), 0.2)
  return beta * (1 + e * n / horizon)


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


def assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf))), leaf


B, T, V, K = 4, 6, 5, 5
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ---------------------------------------------------------------- masked reductions


@pytest.mark.parametrize("axis", [None, 1])
def test_masked_mean_sum(rng, axis):
  x = rng.normal(size=(B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  mean = jax.jit(L.masked_mean, static_argnames="axis")(x, m, axis=axis)
  np.testing.assert_allclose(mean, np_masked_mean(x, m, axis), **TOL)
  np.testing.assert_allclose(L.masked_sum(x, m, axis=axis), (x * m).sum(axis=axis), **TOL)
  # int / bool masks are the same thing.
  np.testing.assert_allclose(L.masked_mean(x, m > 0, axis=axis), mean, **TOL)


def test_masked_sum_ignores_nonfinite_padding():
  x = jnp.array([[1.0, jnp.inf, jnp.nan]])
  m = jnp.array([[1, 0, 0]])
  assert float(L.masked_sum(x, m)) == 1.0
  g = jax.grad(lambda x: L.masked_mean(x, m))(x)
  np.testing.assert_array_equal(g, [[1.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- SFT


def test_sft_loss(rng):
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  m = ragged_mask(rng, B, T, holes=True)
  targets[m == 0] = -100  # padding labels are ignored
  np.testing.assert_allclose(jax.jit(L.sft_loss)(logits, targets, m),
                             np_sft(logits, targets, m), **TOL)


def test_entropy(rng):
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  m = ragged_mask(rng, B, T)
  np.testing.assert_allclose(jax.jit(L.entropy)(logits, m), np_entropy(logits, m), **TOL)
  # −inf logits (filtered tokens) contribute 0 and keep gradients finite.
  logits[..., 0] = -np.inf
  out, g = jax.value_and_grad(L.entropy)(logits, m)
  np.testing.assert_allclose(out, np_entropy(np.maximum(logits, -1e30), m), **TOL)
  assert_finite(g)


# ------------------------------------------------------------------ reward model


def random_rankings(rng, b, k):
  rewards = rng.normal(size=(b, k)).astype(np.float32) * 2
  ranks = rng.integers(0, k - 1, size=(b, k))  # k-1 values over k slots: ties exist
  valid = np.zeros((b, k), np.float32)
  for i in range(b):
    valid[i, :rng.integers(2, k + 1)] = 1
  valid[1, 1:] = 0  # one prompt with a single response: no pair
  return rewards, ranks, valid


def test_ranking_loss(rng):
  rewards, ranks, valid = random_rankings(rng, B, K)
  ref_loss, ref_acc, n_pairs, n_prompts = np_ranking(rewards, ranks, valid)
  rewards[valid == 0] = np.nan  # empty slots hold garbage that must not leak
  fn = jax.jit(jax.value_and_grad(L.ranking_loss, has_aux=True))
  (loss, aux), grad = fn(rewards, ranks, valid)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  np.testing.assert_allclose(aux["accuracy"], ref_acc, **TOL)
  assert aux["num_pairs"] == n_pairs and aux["num_prompts"] == n_prompts
  assert_finite(grad)


_ranking_jit = jax.jit(L.ranking_loss)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(2, 6), seed=st.integers(0, 2 ** 16))
def test_ranking_loss_random_sizes(b, k, seed):
  """b prompts with up to k responses, padded into one [3, 6] shape (one compile)."""
  rng = np.random.default_rng(seed)
  rewards = (rng.normal(size=(3, 6)) * 3).astype(np.float32)
  ranks = rng.integers(0, k, size=(3, 6))
  valid = np.zeros((3, 6), bool)
  valid[:b, :k] = rng.random((b, k)) > 0.2
  loss, aux = _ranking_jit(rewards, ranks, valid)
  ref_loss, ref_acc, n_pairs, n_prompts = np_ranking(rewards, ranks, valid)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  np.testing.assert_allclose(aux["accuracy"], ref_acc, **TOL)
  assert aux["num_pairs"] == n_pairs and aux["num_prompts"] == n_prompts


@settings(max_examples=25, deadline=None)
@given(perms=st.lists(st.permutations(range(K)), min_size=3, max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_ranking_loss_permutation_invariant(perms, seed):
  rewards, ranks, valid = random_rankings(np.random.default_rng(seed), 3, K)
  idx = np.array(perms)
  take = functools.partial(np.take_along_axis, indices=idx, axis=1)
  loss, aux = _ranking_jit(rewards, ranks, valid)
  loss_p, aux_p = _ranking_jit(take(rewards), take(ranks), take(valid))
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux_p["accuracy"], aux["accuracy"], rtol=1e-6, atol=1e-6)


def test_ranking_loss_gradient_matches_finite_differences(rng):
  rewards, ranks, valid = random_rankings(rng, B, K)
  grad = jax.jit(jax.grad(lambda r: L.ranking_loss(r, ranks, valid)[0]))(rewards)
  # Central differences of the float64 reference (independent of the code under test).
  h, fd = 1e-6, np.zeros(rewards.shape)
  for i in np.ndindex(rewards.shape):
    up, dn = rewards.astype(np.float64), rewards.astype(np.float64)
    up[i] += h
    dn[i] -= h
    fd[i] = (np_ranking(up, ranks, valid)[0] - np_ranking(dn, ranks, valid)[0]) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[valid == 0] == 0)


def test_ranking_loss_k2_equals_pairwise_loss(rng):
  chosen = rng.normal(size=B).astype(np.float32)
  rejected = rng.normal(size=B).astype(np.float32)
  swap = rng.random(B) > 0.5  # the chosen response sits in either slot
  rewards = np.where(swap[:, None], np.stack([rejected, chosen], 1),
                     np.stack([chosen, rejected], 1))
  ranks = np.where(swap[:, None], [[1, 0]], [[0, 1]])
  loss_r, aux_r = L.ranking_loss(rewards, ranks, np.ones((B, 2)))
  loss_p, aux_p = L.pairwise_loss(chosen, rejected)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
  np.testing.assert_allclose(aux_r["accuracy"], aux_p["accuracy"])


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_pairwise_loss(rng, margin):
  chosen = rng.normal(size=B).astype(np.float32)
  rejected = rng.normal(size=B).astype(np.float32)
  loss, aux = jax.jit(L.pairwise_loss)(chosen, rejected, margin)
  ref_loss, ref_acc = np_pairwise(chosen, rejected, margin)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  np.testing.assert_allclose(aux["accuracy"], ref_acc, **TOL)


# ---------------------------------------------------------------------------- PPO


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_and_rewards(rng, kind):
  lp = rng.normal(size=(B, T)).astype(np.float32) - 2
  ref = rng.normal(size=(B, T)).astype(np.float32) - 2
  m = ragged_mask(rng, B, T)
  m[2] = [0, 0, 1, 1, 0, 0]  # left and right padded: the score goes to t = 3
  scores = rng.normal(size=B).astype(np.float32)
  np.testing.assert_allclose(L.kl_penalty(lp, ref, kind), np_kl(lp, ref, kind), **TOL)
  ref[m == 0] = -np.inf  # padded reference log-probs must not leak
  fn = jax.jit(L.kl_penalized_rewards, static_argnames="kind")
  out = fn(scores, lp, ref, m, 0.05, kind=kind)
  np.testing.assert_allclose(out, np_kl_rewards(scores, lp, ref, m, 0.05, kind), **TOL)
  assert np.all(np.asarray(out)[1] == 0)  # the row with no valid token gets nothing
  g = jax.grad(lambda lp: fn(scores, lp, ref, m, 0.05, kind=kind).sum())(lp)
  assert_finite(g)


def test_kl_penalty_rejects_unknown_kind():
  with pytest.raises(ValueError, match="kind"):
    L.kl_penalty(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k4")


@pytest.mark.parametrize("holes", [False, True])
def test_gae(rng, holes):
  r = rng.normal(size=(B, T)).astype(np.float32)
  v = rng.normal(size=(B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=holes)
  adv, ret = jax.jit(L.gae)(r, v, m, 0.99, 0.95)
  ref_adv, ref_ret = np_gae(r, v, m, 0.99, 0.95)
  np.testing.assert_allclose(adv, ref_adv, **TOL)
  np.testing.assert_allclose(ret, ref_ret, **TOL)


def test_gae_textbook_right_padded(rng):
  """Right padding: the plain recursion with V_{t+1}·m_{t+1} (terminal after the end)."""
  r = rng.normal(size=(B, T))
  v = rng.normal(size=(B, T))
  m = np.zeros((B, T))
  for i, n in enumerate([T, 0, 3, 1]):
    m[i, :n] = 1
  gamma, lam = 0.9, 0.8
  adv = np.zeros((B, T))
  next_a = np.zeros(B)
  for t in reversed(range(T)):
    next_v = v[:, t + 1] * m[:, t + 1] if t + 1 < T else 0.0
    delta = r[:, t] + gamma * next_v - v[:, t]
    next_a = (delta + gamma * lam * next_a) * m[:, t]
    adv[:, t] = next_a
  out, _ = L.gae(r.astype(np.float32), v.astype(np.float32), m, gamma, lam)
  np.testing.assert_allclose(out, adv, rtol=1e-5, atol=1e-5)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value(rng):
  r = rng.normal(size=(B, T)).astype(np.float32)
  v = rng.normal(size=(B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  adv, ret = L.gae(r, v, m, 1.0, 1.0)
  rtg = np.cumsum((r * m)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, np.where(m > 0, rtg - v, 0), **TOL)
  np.testing.assert_allclose(ret, np.where(m > 0, rtg, 0), **TOL)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(rng, shift_mean):
  x = rng.normal(size=(B, T)).astype(np.float32) * 3 + 1
  m = ragged_mask(rng, B, T, holes=True)
  out = jax.jit(L.whiten, static_argnames="shift_mean")(x, m, shift_mean=shift_mean)
  np.testing.assert_allclose(out, np_whiten(x, m, shift_mean), rtol=1e-4, atol=1e-4)
  if shift_mean:
    np.testing.assert_allclose(np_masked_mean(out, m), 0, atol=1e-5)


@pytest.mark.parametrize("eps_high,dual", [(None, None), (0.28, None), (None, 3.0)])
def test_ppo_policy_loss(rng, eps_high, dual):
  lp = rng.normal(size=(B, T)).astype(np.float32) * 0.3 - 1
  old = lp + rng.normal(size=(B, T)).astype(np.float32) * 0.3
  a = rng.normal(size=(B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  fn = jax.jit(functools.partial(L.ppo_policy_loss, clip_eps=0.2, clip_eps_high=eps_high,
                                 dual_clip=dual))
  loss, aux = fn(lp, old, a, m)
  ref = np_ppo_policy(lp, old, a, m, 0.2, eps_high, dual)
  got = (loss, aux["clip_frac"], aux["approx_kl"], aux["approx_kl_k2"], aux["ratio_mean"],
         aux["ratio_max"])
  for g, want in zip(got, ref):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_ppo_policy_loss_ratio_one_is_minus_mean_advantage(rng):
  lp = rng.normal(size=(B, T)).astype(np.float32)
  a = rng.normal(size=(B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  (loss, aux), g = jax.value_and_grad(L.ppo_policy_loss, has_aux=True)(lp, lp, a, m, 0.2)
  np.testing.assert_allclose(loss, -np_masked_mean(a, m), **TOL)
  # ... and its gradient is the vanilla policy gradient −A·m/Σm.
  np.testing.assert_allclose(g, -a * m / m.sum(), **TOL)
  assert aux["clip_frac"] == 0 and aux["approx_kl"] == 0


def test_ppo_value_loss(rng):
  v = rng.normal(size=(B, T)).astype(np.float32)
  v_old = v + rng.normal(size=(B, T)).astype(np.float32) * 0.5
  ret = rng.normal(size=(B, T)).astype(np.float32)
  m = ragged_mask(rng, B, T, holes=True)
  loss, aux = jax.jit(L.ppo_value_loss, static_argnums=4)(v, v_old, ret, m, 0.2)
  ref_loss, ref_frac = np_ppo_value(v, v_old, ret, m, 0.2)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  np.testing.assert_allclose(aux["clip_frac"], ref_frac, **TOL)
  assert 0 < ref_frac < 1  # both branches exercised
  loss_nc, _ = L.ppo_value_loss(v, v_old, ret, m, None)
  np.testing.assert_allclose(loss_nc, 0.5 * np_masked_mean((v - ret) ** 2, m), **TOL)


# ------------------------------------------------------------------ KL controllers


@pytest.mark.parametrize("kl", [2.0, 5.5, 6.0, 7.0, 30.0])
def test_adaptive_kl_update(kl):
  out = jax.jit(L.adaptive_kl_update)(0.1, kl, 512, 6.0, 10000.0)
  np.testing.assert_allclose(out, np_adaptive_kl(0.1, kl, 512, 6.0, 10000.0), rtol=1e-6)


def test_kl_controllers():
  update = jax.jit(L.kl_controller_update)
  fixed = L.kl_controller_init("fixed", 0.02)
  assert float(update(fixed, 100.0, 256).kl_coef) == pytest.approx(0.02)
  state = L.kl_controller_init("adaptive", 0.1, target=6.0, horizon=10000.0)
  want = 0.1
  for kl in [30.0, 3.0, 6.5]:
    state = update(state, kl, 256)
    want = np_adaptive_kl(want, kl, 256, 6.0, 10000.0)
    np.testing.assert_allclose(state.kl_coef, want, rtol=1e-6)
  # An array-only pytree: checkpointable, and maps leaf by leaf.
  leaves = jax.tree.leaves(state)
  assert len(leaves) == 4 and all(isinstance(x, jax.Array) for x in leaves)
  assert jax.tree.structure(jax.tree.map(np.asarray, state)) == jax.tree.structure(state)
  with pytest.raises(ValueError, match="kind"):
    L.kl_controller_init("pid", 0.1)
  with pytest.raises(ValueError, match="target"):
    L.kl_controller_init("adaptive", 0.1, horizon=10.0)


# ------------------------------------------- every function: masking, dtypes, extremes


def _cases(rng, scale=1.0, lp_gap=0.5, dtype=np.float32):
  """(name, fn of float inputs -> scalar, float inputs, extra args) for every function."""
  f = lambda *shape: (rng.normal(size=shape) * scale).astype(dtype)
  m = ragged_mask(rng, B, T, holes=True)
  tg = rng.integers(0, V, size=(B, T))
  lp = (rng.normal(size=(B, T)) - 3).astype(dtype)
  lp2 = (lp.astype(np.float64) + lp_gap * rng.choice([-1, 1], size=(B, T))).astype(dtype)
  ranks = rng.integers(0, K, size=(B, K))
  valid = np.ones((B, K))
  return m, valid, [
      ("masked_mean", lambda x, m: L.masked_mean(x, m), (f(B, T),)),
      ("masked_sum", lambda x, m: L.masked_sum(x, m), (f(B, T),)),
      ("sft_loss", lambda z, m: L.sft_loss(z, tg, m), (f(B, T, V),)),
      ("entropy", lambda z, m: L.entropy(z, m), (f(B, T, V),)),
      ("ranking_loss", lambda r, v: L.ranking_loss(r, ranks, v)[0], (f(B, K),)),
      ("pairwise_loss", lambda c, r: L.pairwise_loss(c, r)[0], (f(B), f(B))),
      *[(f"kl_rewards_{k}", functools.partial(
          lambda s, a, b, m, k: L.kl_penalized_rewards(s, a, b, m, 0.1, k).sum(), k=k),
         (f(B), lp, lp2)) for k in ("k1", "k2", "k3")],
      ("gae", lambda r, v, m: sum(x.sum() for x in L.gae(r, v, m, 1.0, 0.95)),
       (f(B, T), f(B, T))),
      ("whiten", lambda x, m: (L.whiten(x, m) ** 2).sum(), (f(B, T),)),
      ("ppo_policy_loss", lambda a, b, adv, m: L.ppo_policy_loss(a, b, adv, m, 0.2,
                                                                  dual_clip=3.0)[0],
       (lp, lp2, f(B, T))),
      ("ppo_value_loss", lambda v, o, r, m: L.ppo_value_loss(v, o, r, m, 0.2)[0],
       (f(B, T), f(B, T), f(B, T))),
  ]


def _run(name, fn, args, mask, valid, grad=True):
  """Value and gradient w.r.t. every float input (jitted); value only if not grad."""
  if name == "pairwise_loss":
    call = fn
  elif name == "ranking_loss":
    call = lambda *a: fn(*a, valid)
  else:
    call = lambda *a: fn(*a, mask)
  if not grad:
    return jax.jit(call)(*args)
  return jax.jit(jax.value_and_grad(call, argnums=tuple(range(len(args)))))(*args)


def test_all_masked_gives_finite_zero(rng):
  mask, valid, cases = _cases(rng)
  for name, fn, args in cases:
    if name == "pairwise_loss":
      args = (np.zeros(0, np.float32),) * 2  # an empty batch is the unmasked analogue
    val, grads = _run(name, fn, args, np.zeros_like(mask), np.zeros_like(valid))
    assert float(val) == 0.0, name
    for g in grads:
      np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=name)


def test_extreme_inputs_finite(rng):
  # Reward / logit gaps of ~1e4 and log-prob differences of 50.
  mask, valid, cases = _cases(rng, scale=1e4, lp_gap=50.0)
  for name, fn, args in cases:
    val, grads = _run(name, fn, args, mask, valid)
    assert np.isfinite(float(val)), name
    assert_finite(grads)


def test_bfloat16_inputs_match_float32():
  mask, valid, cases = _cases(np.random.default_rng(1), dtype=jnp.bfloat16)
  for name, fn, a16 in cases:
    assert all(a.dtype == jnp.bfloat16 for a in a16)
    v16, g16 = _run(name, fn, a16, mask, valid)
    assert v16.dtype == jnp.float32, name
    # The same (bf16-rounded) values as float32 give the same float32 result.
    v32 = _run(name, fn, tuple(np.asarray(a, np.float32) for a in a16), mask, valid,
               grad=False)
    np.testing.assert_allclose(v16, v32, rtol=1e-5, atol=1e-5, err_msg=name)
    assert_finite(g16)


def test_shape_mismatch_is_an_error():
  with pytest.raises(AssertionError):
    L.masked_mean(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(AssertionError):
    L.ppo_policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2,)),
                      jnp.ones((2, 3)), 0.2)
  with pytest.raises(ValueError, match="dual_clip"):
    L.ppo_policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                      jnp.ones((2, 3)), 0.2, dual_clip=0.5)
