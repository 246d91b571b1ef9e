"""One PPO iteration (experience + one update) against a float64 reference from the papers.

The reference is given the same model outputs as the code (`models.logits` / `models.values`
of the same params, cast to float64) and does all the RL maths itself, with explicit loops:
- rewards: InstructGPT eq. 2 / Ziegler et al. 2019 §2.2, r_t = −β·(log π_old − log π_ref)
  per valid response token, plus the normalised RM score (read at the last valid response
  token, minus `no_eos_penalty` when no valid token is EOS) on that last token;
- GAE: Schulman et al. 2016 eq. 16 over valid tokens (V = 0 after the last one), returns =
  A + V, advantages whitened over the batch's valid tokens ((x − μ)/sqrt(σ² + 1e-8));
- loss: PPO clipped surrogate (Schulman et al. 2017 eq. 7), the PPO2 clipped value loss
  0.5·max((V − R)², (clip(V, V_old ± ε) − R)²) and the PTX next-token NLL, each a
  token-level masked mean, total = pg + vf_coef·v + ptx_coef·ptx.
It never calls `rlhf_jax.losses`. Temperature 0.7, γ = 0.9, λ = 0.8 and coefficients ≠ 1
make a dropped temperature / swapped γ-λ / ignored coefficient visible.

Conventions the papers leave open, pinned to what the code does: the 0.5 in the value loss
is PPO2's (OpenAI baselines; eq. 9 itself has c1·(V − V_targ)², so vf_coef = 1 here is
c1 = 0.5 there); the PTX NLL is of the untempered logits (T = 1) while every PPO log-prob
uses logits / T; a row with no response token reads the RM at the prompt's last token and,
having no EOS, is penalised (its score still enters the `score` metric).

Tolerance: rtol 1e-5 for float32 results of O(1); log-probs are O(4) nats from [P+N, 64]
softmaxes, and whitened advantages near 0 get an absolute 2e-6 (float32 eps × a few O(1)
terms summed by the scans).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import models, optim, sharding
from rlhf_jax.trainers import ppo, ppo_experience
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=1, eos_token_id=1,
                                        pad_token_id=0)
EOS, PAD = 1, 0
B, P, N = 8, 6, 6
TEMPERATURE = 0.7
KL_COEF = 0.1
RTOL, ATOL = 1e-5, 2e-6


# ------------------------------------------------- the code under test (repoint here)


def run_experience(ppo_cfg, normalization, policy, ref, value, reward, batch):
  """The one call into the experience code: (Experience, metrics) as host numpy."""
  fn = jax.jit(ppo_experience.make_experience_fn(CFG, CFG, CFG, ppo_cfg, normalization, EOS,
                                                 P))
  exp, metrics = fn(policy, ref, value, reward, jnp.float32(KL_COEF), batch["prompt_ids"],
                    batch["prompt_mask"], batch["tokens"], batch["response_mask"])
  return exp, _host(metrics)


def run_update(ppo_cfg, policy, value, exp, ptx_batch):
  """The one call into the update code: one `update` on a fresh state; its metrics."""
  optim_cfg = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, schedule="constant", final_lr_frac=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-6, grad_clip=1.0))
  policy_tx = optim.make_optimizer(optim_cfg, 10)
  value_tx = optim.make_optimizer(optim_cfg, 10)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  rules = dict(sharding.DEFAULT_RULES)
  pol_shard = state_lib.model_shardings(mesh, CFG, "causal", rules)
  val_shard = state_lib.model_shardings(mesh, CFG, "scalar", rules)
  _, init_state, _ = state_lib.build(mesh, 0, {
      "policy": (state_lib.place(policy, pol_shard), pol_shard, policy_tx),
      "value": (state_lib.place(value, val_shard), val_shard, value_tx)})
  state = init_state()
  state["kl_ctl"] = dict(kl_coef=jnp.float32(KL_COEF), target=jnp.float32(1.0),
                         horizon=jnp.float32(1.0), adaptive=jnp.asarray(False))
  update = jax.jit(ppo.make_update_fn(CFG, CFG, ppo_cfg, policy_tx, value_tx, P,
                                      use_ptx=True))
  new, metrics = update(state, exp, ptx_batch, jax.random.PRNGKey(7))
  assert int(new["total_skips"]) == 0
  return _host(metrics)


# ------------------------------------------------------------------------ test data


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _perturb(params, scale, seed):
  """params + scale · rms(leaf) · N(0, 1) on every matrix (norm scales stay 1)."""
  rng = np.random.default_rng(seed)

  def f(x):
    x = np.asarray(x)
    if x.ndim < 2:
      return x
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64)))
    return (x + scale * rms * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree.map(f, params)


def _batch():
  """Left-padded prompts and right-padded responses covering every end-of-response case."""
  rng = np.random.default_rng(0)
  # (prompt length, response length, index of EOS or None) per row
  rows = [(6, 3, 2),       # EOS mid-response
          (4, 6, 5),       # EOS as the last possible token
          (5, 6, None),    # truncated: no EOS
          (3, 1, 0),       # EOS first: a one-token response
          (6, 0, None),    # no response token at all (the code reads the RM at the prompt end)
          (2, 3, None),    # no EOS among the valid tokens, but an EOS id in a padded slot
          (2, 4, 3),       # EOS mid-response, long left padding
          (1, 6, None)]    # one prompt token, no EOS
  pids = np.full((B, P), PAD, np.int32)
  pmask = np.zeros((B, P), np.int32)
  tokens = np.full((B, N), PAD, np.int32)
  rmask = np.zeros((B, N), np.int32)
  for b, (plen, rlen, eos_at) in enumerate(rows):
    pids[b, P - plen:] = rng.integers(3, CFG.vocab_size, plen)
    pmask[b, P - plen:] = 1
    tokens[b, :rlen] = rng.integers(3, CFG.vocab_size, rlen)
    rmask[b, :rlen] = 1
    if eos_at is not None:
      tokens[b, eos_at] = EOS
  tokens[5, 4] = EOS   # masked: must not count as "emitted EOS"
  return dict(prompt_ids=pids, prompt_mask=pmask, tokens=tokens, response_mask=rmask)


def _ptx_batch():
  """Right-padded pretraining rows; loss_mask drops the first 2 targets of each row."""
  rng = np.random.default_rng(1)
  rows, t = 4, 10
  ids = rng.integers(3, CFG.vocab_size, (rows, t)).astype(np.int32)
  lengths = np.array([10, 7, 5, 9])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, PAD).astype(np.int32)
  loss_mask = np.broadcast_to((np.arange(t) >= 2).astype(np.int32), (rows, t)).copy()
  loss_mask[3, :] = 1   # this row's first target counts too
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)


def _ppo_cfg(**overrides):
  p = config_lib.ppo_config().ppo
  p.temperature = TEMPERATURE
  p.kl_coef = KL_COEF
  p.no_eos_penalty = 0.7
  p.epochs, p.minibatches = 1, 1
  p.clip_eps, p.value_clip_eps = 0.2, 0.2
  p.vf_coef, p.ptx_coef = 0.7, 0.3
  p.gamma, p.lam = 0.9, 0.8
  for k, v in overrides.items():
    p[k] = v
  return p


BATCH = _batch()
PTX = _ptx_batch()
REF = _host(models.init(CFG, jax.random.PRNGKey(1), kind="causal"))
POLICY = _perturb(REF, 0.5, seed=10)                  # π_old ≠ π_ref: KL ≠ 0
VALUE = _host(models.init(CFG, jax.random.PRNGKey(2), kind="scalar"))
REWARD = _host(models.init(CFG, jax.random.PRNGKey(3), kind="scalar"))
# Params the update starts from: a moved policy / value, so ratios ≠ 1 and clipping engages.
POLICY_NEW = _perturb(POLICY, 1.0, seed=11)
VALUE_NEW = _perturb(VALUE, 3.0, seed=12)


# ------------------------------------------------------------- float64 references


def _ids_and_mask(batch):
  ids = np.concatenate([batch["prompt_ids"], batch["tokens"]], axis=1)
  mask = np.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
  return ids, mask


def ref_logprobs(params, batch, temperature):
  """log softmax(logits / T)[y_t] and entropy, predicted from position P − 1 + t."""
  ids, mask = _ids_and_mask(batch)
  logits = np.asarray(models.logits(CFG, params, ids, mask), np.float64)
  logp = np.zeros((B, N))
  ent = np.zeros((B, N))
  for b in range(B):
    for t in range(N):
      z = logits[b, P - 1 + t] / temperature
      lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
      lp = z - lse
      logp[b, t] = lp[ids[b, P + t]]
      ent[b, t] = -np.sum(np.exp(lp) * lp)
  return logp, ent


def ref_head(params, batch):
  """The scalar head at every position, float64 [B, P+N]."""
  ids, mask = _ids_and_mask(batch)
  return np.asarray(models.values(CFG, params, ids, mask), np.float64)


def ref_experience(ppo_cfg, normalization, batch):
  m = batch["response_mask"]
  old, ent = ref_logprobs(POLICY, batch, ppo_cfg.temperature)
  refl, _ = ref_logprobs(REF, batch, ppo_cfg.temperature)
  head_v = ref_head(VALUE, batch)
  head_r = ref_head(REWARD, batch)
  values = np.zeros((B, N))
  rewards = np.zeros((B, N))
  scores, raws, kls, has_eos = np.zeros(B), np.zeros(B), np.zeros(B), np.zeros(B, bool)
  for b in range(B):
    valid = [t for t in range(N) if m[b, t]]
    for t in valid:
      values[b, t] = head_v[b, P - 1 + t]   # V(x, y_<t): read before token t
      rewards[b, t] = -KL_COEF * (old[b, t] - refl[b, t])
      kls[b] += old[b, t] - refl[b, t]
    raws[b] = head_r[b, P - 1 + len(valid)]  # the last valid response token
    scale = normalization["std"] if normalization["gain"] else 1.0
    scores[b] = (raws[b] - normalization["mean"]) / scale
    has_eos[b] = any(batch["tokens"][b, t] == EOS for t in valid)
    if not has_eos[b]:
      scores[b] -= ppo_cfg.no_eos_penalty
    if valid:
      rewards[b, valid[-1]] += scores[b]
  adv = np.zeros((B, N))
  for b in range(B):
    next_v, next_a = 0.0, 0.0   # terminal after the last valid token
    for t in reversed(range(N)):
      if not m[b, t]:
        continue
      delta = rewards[b, t] + ppo_cfg.gamma * next_v - values[b, t]
      adv[b, t] = delta + ppo_cfg.gamma * ppo_cfg.lam * next_a
      next_v, next_a = values[b, t], adv[b, t]
  returns = (adv + values) * m
  if ppo_cfg.whiten_advantages:
    flat = [adv[b, t] for b in range(B) for t in range(N) if m[b, t]]
    mu = sum(flat) / len(flat)
    var = sum((x - mu) ** 2 for x in flat) / len(flat)
    adv = (adv - mu) / np.sqrt(var + 1e-8) * m
  tok = m > 0
  res = (returns - values)[tok]
  metrics = dict(score=scores.mean(), raw_score=raws.mean(), kl=kls.mean(),
                 entropy=ent[tok].mean(), no_eos_frac=1.0 - has_eos.mean(),
                 response_length=m.sum(1).mean(), reward_total=rewards.sum(1).mean(),
                 value_mean=values[tok].mean(),
                 explained_variance=1.0 - res.var() / returns[tok].var())
  arrays = dict(old_logprobs=old * m, ref_logprobs=refl * m, values=values,
                advantages=adv, returns=returns)
  return arrays, metrics


def ref_losses(ppo_cfg, exp):
  """Loss terms at (POLICY_NEW, VALUE_NEW) for the code's experience `exp` (float64)."""
  m = np.asarray(exp["response_mask"], np.float64)
  old = np.asarray(exp["old_logprobs"], np.float64)
  adv = np.asarray(exp["advantages"], np.float64)
  v_old = np.asarray(exp["values"], np.float64)
  ret = np.asarray(exp["returns"], np.float64)
  new, ent = ref_logprobs(POLICY_NEW, BATCH, ppo_cfg.temperature)
  head_v = ref_head(VALUE_NEW, BATCH)
  eps, eps_v = ppo_cfg.clip_eps, ppo_cfg.value_clip_eps
  pg = vf = kl = ents = 0.0
  n_tok = n_pg_clip = n_v_clip = 0
  ratios, v_moves = [], []
  for b in range(B):
    for t in range(N):
      if not m[b, t]:
        continue
      n_tok += 1
      ratio = np.exp(new[b, t] - old[b, t])
      ratios.append(ratio)
      a = adv[b, t]
      # eq. 7: maximise min(ρA, clip(ρ)A) -> minimise its negation
      surr = min(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
      pg += -surr
      # "clipped" = the clipped term is the binding one (the token gets no gradient)
      n_pg_clip += (a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps)
      v = head_v[b, P - 1 + t]
      d = v - v_old[b, t]
      v_clip = v if abs(d) <= eps_v else v_old[b, t] + np.sign(d) * eps_v
      v_moves.append(abs(d))
      err, err_clip = (v - ret[b, t]) ** 2, (v_clip - ret[b, t]) ** 2
      vf += 0.5 * max(err, err_clip)
      n_v_clip += err_clip > err
      kl += old[b, t] - new[b, t]
      ents += ent[b, t]
  ids, amask, lmask = PTX["input_ids"], PTX["attention_mask"], PTX["loss_mask"]
  logits = np.asarray(models.logits(CFG, POLICY_NEW, ids, amask), np.float64)
  nll, count = 0.0, 0
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1] - 1):
      # The target token's weights; untempered logits: the pretraining likelihood is the
      # model's own, the temperature is a property of PPO's sampling.
      if lmask[b, t + 1] and amask[b, t + 1]:
        z = logits[b, t]
        lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
        nll += lse - z[ids[b, t + 1]]
        count += 1
  out = dict(policy_loss=pg / n_tok, value_loss=vf / n_tok, ptx_loss=nll / count,
             policy_clip_frac=n_pg_clip / n_tok, value_clip_frac=n_v_clip / n_tok,
             approx_kl=kl / n_tok, train_entropy=ents / n_tok)
  out["loss"] = (out["policy_loss"] + ppo_cfg.vf_coef * out["value_loss"]
                 + ppo_cfg.ptx_coef * out["ptx_loss"])
  return out, np.array(ratios), np.array(v_moves)


# --------------------------------------------------------------------------- tests


def _close(got, want, what, atol=ATOL):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=atol,
                             err_msg=what)


CASES = {
    # InstructGPT-style: normalised RM with gain, whitened advantages.
    "gain_whiten": (dict(mean=0.25, std=2.0, gain=True), dict(whiten_advantages=True)),
    # No gain (std must be ignored), raw GAE advantages.
    "nogain_raw": (dict(mean=0.25, std=2.0, gain=False), dict(whiten_advantages=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_experience_matches_float64_reference(case):
  normalization, overrides = CASES[case]
  p = _ppo_cfg(**overrides)
  exp, metrics = run_experience(p, normalization, POLICY, REF, VALUE, REWARD, BATCH)
  exp = _host(exp._asdict())
  want, want_metrics = ref_experience(p, normalization, BATCH)
  m = BATCH["response_mask"]
  np.testing.assert_array_equal(exp["response_mask"], m)
  for key in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
    # Padded slots hold whatever the model predicts there; only valid tokens are compared
    # for the log-probs (values / advantages / returns must be 0 there).
    got = exp[key] * m if key.endswith("logprobs") else exp[key]
    _close(got, want[key], f"{case}: {key}")
  for key, value in want_metrics.items():
    _close(metrics[key], value, f"{case}: metric {key}")
  # The data really exercises what it is meant to.
  assert abs(want_metrics["kl"]) > 1e-2
  assert 0.0 < want_metrics["no_eos_frac"] < 1.0


def test_loss_of_one_update_matches_float64_reference():
  p = _ppo_cfg()
  exp, _ = run_experience(p, dict(mean=0.25, std=2.0, gain=True), POLICY, REF, VALUE, REWARD,
                          BATCH)
  want, ratios, v_moves = ref_losses(p, _host(exp._asdict()))
  # Some but not all tokens clipped, and none so close to 1 ± ε that float32 could flip it.
  assert 0.0 < want["policy_clip_frac"] < 1.0, want["policy_clip_frac"]
  assert 0.0 < want["value_clip_frac"] < 1.0, want["value_clip_frac"]
  margin = np.min(np.abs(np.abs(ratios - 1.0) - p.clip_eps))
  assert margin > 1e-4, f"a ratio is within {margin} of 1 ± ε: pick other perturbations"
  margin = np.min(np.abs(v_moves - p.value_clip_eps))
  assert margin > 1e-4, f"a value moved within {margin} of ε_v: pick other perturbations"
  metrics = run_update(p, POLICY_NEW, VALUE_NEW, exp, PTX)
  for key, value in want.items():
    _close(metrics[key], value, f"update metric {key}")
