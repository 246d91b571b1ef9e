"""`ppo.old_logprobs="sampler"`: the rollout's own log-probs as PPO's π_old (issue 18 item 4).

The independent reference is the policy's full forward (`objectives.response_logprobs`),
which `ppo.old_logprobs="score"` (the default) runs. In float32 the sampler's KV-cache decode
path and that forward are the same arithmetic up to rounding, so they must agree within
1e-5 nats a token (measured: ~2e-6 at GPT-2 shape, bench/sampler_logprobs.py). The saving is
one policy forward per iteration: the experience traces one `response_logprobs` fewer and
its compiled FLOPs drop by about one forward's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import models, objectives, sampling, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import grpo, model_init, ppo
from rlhf_jax.trainers import ppo_experience as experience_lib
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=2, eos_token_id=1,
                                        pad_token_id=0)
EOS, PAD = 1, 0
RULES = state_lib.parse_rules("")
TEMPERATURE = 0.7        # not 1: the sampler and the forward must divide by the same value
LOGP_TOL = 1e-5          # float32 rounding of two paths through the same weights
B, P, N = 8, 6, 8


def _mesh(devices=1):
  return sharding.make_mesh(dict(data=devices, fsdp=1, tensor=1),
                            devices=jax.devices()[:devices])


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _params(kind, seed):
  return jax.device_get(models.init(CFG, jax.random.PRNGKey(seed), kind=kind))


def _prompts(mesh):
  ids = np.random.default_rng(1).integers(4, CFG.vocab_size, (B, P)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[:3, :2] = 0    # a few left-padded rows
  return sharding.host_to_global(mesh, dict(input_ids=np.where(mask > 0, ids, PAD),
                                            attention_mask=mask))


def _ppo_parts(mesh, old_logprobs):
  c = config_lib.ppo_config()
  c.train.batch_size = B
  p = c.ppo
  p.minibatches, p.epochs, p.max_new_tokens, p.ptx_coef = 2, 2, N, 0.0
  p.temperature, p.kl_coef, p.iterations = TEMPERATURE, 0.1, 4
  p.old_logprobs = old_logprobs
  c.optim.lr = 1e-3
  config_lib.validate(c)
  place = lambda kind, params: model_init.place(mesh, RULES, CFG, kind, params)  # noqa: E731
  m = ppo.Models(policy=place("causal", _params("causal", 0)),
                 value=place("scalar", _params("scalar", 1)),
                 reward=place("scalar", _params("scalar", 2)),
                 normalization=dict(workdir_lib.NO_NORMALIZATION), eos_id=EOS, pad_id=PAD,
                 stop_ids=(EOS,))
  return ppo.build(c, mesh, m, use_ptx=False)


def _count_logprob_calls(monkeypatch):
  """Counts `objectives.response_logprobs` calls: each is one causal forward in the traced
  (and so the compiled) program; counting at trace time needs functions not yet compiled."""
  calls = []
  real = objectives.response_logprobs

  def counted(*args, **kwargs):
    calls.append(kwargs.get("with_entropy", False))
    return real(*args, **kwargs)

  monkeypatch.setattr(objectives, "response_logprobs", counted)
  return calls


def _valid_max_diff(a, b, mask):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(mask)))


# ------------------------------------------------------- the sampler vs the full forward


def test_sampler_logprobs_equal_the_full_forward_in_float32():
  params = _params("causal", 0)
  batch = _prompts(_mesh())
  out = sampling.generate(CFG, params, batch["input_ids"], batch["attention_mask"],
                          jax.random.PRNGKey(3), max_new_tokens=N, temperature=TEMPERATURE,
                          eos_id=EOS, pad_id=PAD)
  ids = jnp.concatenate([batch["input_ids"], out.tokens], axis=1)
  mask = jnp.concatenate([batch["attention_mask"], out.mask], axis=1)
  want = objectives.response_logprobs(CFG, params, ids, mask, P, TEMPERATURE)
  mask_np = np.asarray(out.mask)
  assert 0 < mask_np.sum() and mask_np.min() == 0   # some rows stopped: padding is covered
  assert _valid_max_diff(out.logprobs, want, mask_np) < LOGP_TOL
  assert np.all(np.asarray(out.logprobs)[mask_np == 0] == 0)
  assert float(np.max(np.abs(np.asarray(want) * mask_np))) > 0.5   # not vacuous


# ------------------------------------------------------- PPO: experience, update, saving


def _experience(parts, state, batch, key):
  policy = parts.policy_params(state["policy"])
  out = ppo.rollout(parts, policy, batch, key)
  exp, metrics, _ = ppo.experience(parts, policy, state["value"], state["kl_ctl"]["kl_coef"],
                                   batch, out)
  return out, _host(exp)._asdict(), _host(metrics)


def test_ppo_sampler_mode_matches_scoring_and_runs_one_forward_fewer(monkeypatch):
  calls = _count_logprob_calls(monkeypatch)
  mesh = _mesh()
  batch = _prompts(mesh)
  key = jax.random.PRNGKey(4)
  parts, exps, params, traced = {}, {}, {}, {}
  for mode in ("score", "sampler"):
    parts[mode] = _ppo_parts(mesh, mode)
    state = parts[mode].init_state()
    del calls[:]
    out, exps[mode], metrics = _experience(parts[mode], state, batch, key)
    traced[mode] = list(calls)
    assert np.isfinite(metrics["entropy"]) and metrics["entropy"] > 0
    for i in range(2):
      state, _ = ppo.iteration(parts[mode], state, batch, None, jax.random.PRNGKey(10 + i))
    params[mode] = _host(state["policy"])
  # The saving: scoring traces the policy (with entropy) and the reference; the sampler
  # mode the reference alone.
  assert traced == {"score": [True, False], "sampler": [False]}
  s, r = exps["score"], exps["sampler"]
  mask = s["response_mask"]
  np.testing.assert_array_equal(s["input_ids"], r["input_ids"])   # the same rollout
  assert mask.sum() > 0
  assert _valid_max_diff(s["old_logprobs"], r["old_logprobs"], mask) < LOGP_TOL
  assert np.all(r["old_logprobs"][mask == 0] == 0)
  np.testing.assert_array_equal(s["ref_logprobs"], r["ref_logprobs"])
  np.testing.assert_allclose(r["advantages"], s["advantages"], atol=1e-4)
  # Two iterations (2 epochs × 2 minibatches each: 8 Adam steps at lr 1e-3) from the same
  # start: the only input that differs is π_old, by < 1e-5 nats (measured ~5e-7), which
  # moves the ratio and the KL reward by as little. Adam divides each coordinate's gradient
  # by its own scale (eps 1e-8), so coordinates whose gradient is ~0 can turn a tiny change
  # into a visible fraction of their step (measured max 8e-6): the max is held to 5% of lr,
  # and the whole update to 1e-4 of its size (measured 9e-6).
  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]  # noqa: E731
  score_p, sampler_p, start = (leaves(params["score"]), leaves(params["sampler"]),
                               leaves(_params("causal", 0)))
  l2 = lambda xs: float(np.sqrt(sum(np.sum(np.square(x)) for x in xs)))  # noqa: E731
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(score_p, sampler_p))
  rel = l2([a - b for a, b in zip(score_p, sampler_p)]) / l2(
      [a - b for a, b in zip(score_p, start)])
  print(f"params after 2 iterations: max |score - sampler| {diff:.2g}, relative L2 {rel:.2g}")
  assert diff < 5e-5 and rel < 1e-4, (diff, rel)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(score_p, start)) > 1e-3   # trained


def test_entropy_metric_is_the_sampled_tokens_negative_logprob_mean():
  """Under "sampler" the logged entropy is the masked mean of −log π_old of the samples
  (an unbiased estimate of the forward's exact entropy, close to it on 64 tokens)."""
  mesh = _mesh()
  batch = _prompts(mesh)
  key = jax.random.PRNGKey(4)
  got = {}
  for mode in ("score", "sampler"):
    parts = _ppo_parts(mesh, mode)
    _, exp, metrics = _experience(parts, parts.init_state(), batch, key)
    got[mode] = metrics["entropy"]
  mask = exp["response_mask"]
  np.testing.assert_allclose(got["sampler"], -np.sum(exp["old_logprobs"] * mask) / mask.sum(),
                             rtol=1e-6)
  print(f"entropy: forward {got['score']:.4f}, sampled estimate {got['sampler']:.4f}")
  assert abs(got["sampler"] - got["score"]) < 0.25 * got["score"], got


def test_reused_logprobs_are_zero_off_the_response_mask():
  """Whatever a caller's log-probs hold past a row's end, π_old and the entropy estimate
  there are 0, as the update's masked sums assume."""
  rmask = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
  garbage = jnp.asarray([[-1.0, -2.0, -7.0, -9.0], [-3.0, -5.0, -5.0, -5.0]])
  logp, entropy = experience_lib.old_logprobs(CFG, None, None, None, P, TEMPERATURE, rmask,
                                              garbage)
  np.testing.assert_array_equal(logp, [[-1, -2, 0, 0], [-3, 0, 0, 0]])
  np.testing.assert_array_equal(entropy, [[1, 2, 0, 0], [3, 0, 0, 0]])


def test_the_score_phase_saves_one_policy_forward_of_flops():
  """The compiled experience's FLOPs drop by those of one `response_logprobs` (the policy's
  forward with its entropy): the figure the option saves, on this tiny shape."""
  mesh = _mesh()
  batch = _prompts(mesh)
  parts = _ppo_parts(mesh, "sampler")
  state = parts.init_state()
  policy = state["policy"]
  out = ppo.rollout(parts, policy, batch, jax.random.PRNGKey(4))
  exp_fn, _ = parts.fns(P)
  args = (policy, parts.models.policy.params, state["value"], parts.models.reward.params,
          state["kl_ctl"]["kl_coef"], batch["input_ids"], batch["attention_mask"], out.tokens,
          out.mask)

  def flops(lowered):
    cost = lowered.compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  score = flops(exp_fn.lower(*args))
  sampler = flops(exp_fn.lower(*args, sampler_logprobs=out.logprobs))
  ids = jnp.concatenate([batch["input_ids"], out.tokens], axis=1)
  mask = jnp.concatenate([batch["attention_mask"], out.mask], axis=1)
  forward = flops(jax.jit(lambda p, i, m: objectives.response_logprobs(
      CFG, p, i, m, P, TEMPERATURE, with_entropy=True)).lower(policy, ids, mask))
  saved = score - sampler
  print(f"experience FLOPs: score {score:.3g}, sampler {sampler:.3g}, saved {saved:.3g} "
        f"({saved / score:.1%}); one policy forward {forward:.3g}")
  np.testing.assert_allclose(saved, forward, rtol=0.1)


def test_sampler_logprobs_keep_the_tokens_sharding_on_eight_devices():
  """Data-parallel over 8 devices: the logprobs enter the experience sharded as the tokens,
  and the experience equals the one-device scoring run's."""
  mesh8 = _mesh(8)
  parts = _ppo_parts(mesh8, "sampler")
  state = parts.init_state()
  batch = _prompts(mesh8)
  policy = state["policy"]
  out = ppo.rollout(parts, policy, batch, jax.random.PRNGKey(4))
  assert out.logprobs.sharding.is_equivalent_to(out.tokens.sharding, 2)
  assert len(out.tokens.sharding.device_set) == 8
  exp, _, _ = ppo.experience(parts, policy, state["value"], state["kl_ctl"]["kl_coef"], batch,
                             out)
  one = _ppo_parts(_mesh(), "score")
  _, want, _ = _experience(one, one.init_state(), _prompts(_mesh()), jax.random.PRNGKey(4))
  got = _host(exp)._asdict()
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  assert _valid_max_diff(got["old_logprobs"], want["old_logprobs"],
                         want["response_mask"]) < LOGP_TOL


# ------------------------------------------------------------------------------- GRPO


def test_grpo_rollout_reuses_the_sampler_logprobs_too(monkeypatch):
  calls = _count_logprob_calls(monkeypatch)
  mesh = _mesh()
  group = 2
  rollouts = {}
  for mode in ("score", "sampler"):
    c = config_lib.grpo_config()
    c.train.batch_size, c.grpo.group_size = B // group, group
    c.ppo.temperature, c.ppo.max_new_tokens, c.ppo.minibatches = TEMPERATURE, N, 2
    c.ppo.old_logprobs = mode
    config_lib.validate(c)
    m = ppo.Models(policy=model_init.place(mesh, RULES, CFG, "causal", _params("causal", 0)),
                   value=None,
                   reward=model_init.place(mesh, RULES, CFG, "scalar", _params("scalar", 2)),
                   normalization=dict(workdir_lib.NO_NORMALIZATION), eos_id=EOS, pad_id=PAD,
                   stop_ids=(EOS,))
    parts = grpo.build(c, mesh, m, use_ptx=False)
    state = parts.init_state()
    batch = _prompts(mesh)
    out = ppo.rollout(parts, state["policy"], batch, jax.random.PRNGKey(4))
    del calls[:]
    rollout, metrics, _ = grpo.score_rollout(parts, state["policy"], batch, out)
    assert len(calls) == (2 if mode == "score" else 1), (mode, calls)
    rollouts[mode] = _host(rollout)._asdict()
  s, r = rollouts["score"], rollouts["sampler"]
  assert _valid_max_diff(s["old_logprobs"], r["old_logprobs"], s["response_mask"]) < LOGP_TOL
  np.testing.assert_allclose(r["advantages"], s["advantages"], atol=1e-4)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("make", [config_lib.ppo_config, config_lib.grpo_config])
def test_old_logprobs_is_validated_by_name(make):
  c = make()
  assert c.ppo.old_logprobs == "score"   # the default keeps the full forward
  c.task = "default"
  c.ppo.old_logprobs = "sampler"
  config_lib.validate(c)
  c.ppo.old_logprobs = "decode"
  with pytest.raises(ConfigError, match=r"config\.ppo\.old_logprobs='decode'.*'score', "
                     r"'sampler'"):
    config_lib.validate(c)
