"""PPO settings that used to give silently wrong results (issue: "PPO you can trust").

Each test pins one fix against an independent oracle: the closed-form normalised reward for
the value model's starting units, a plain numpy mean for the RM normalisation, the adaptive
controller's own formula for β, and the config errors by field name.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import losses, models, objectives, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.trainers import model_init, ppo, rm
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=1, eos_token_id=1,
                                        pad_token_id=0)
EOS, PAD = 1, 0
RULES = state_lib.parse_rules("")


def _mesh():
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _scalar_params(seed, bias):
  params = jax.device_get(models.init(CFG, jax.random.PRNGKey(seed), kind="scalar"))
  params["head"]["bias"] = np.full_like(np.asarray(params["head"]["bias"]), bias)
  return params


def _batch(rng, b=8, t=10):
  ids = rng.integers(4, 14, (b, t)).astype(np.int32)
  lengths = rng.integers(4, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  return np.where(mask > 0, ids, PAD).astype(np.int32), mask, (lengths - 1).astype(np.int32)


# ----------------------------------------------------------- 1. filtered sampling refused


@pytest.mark.parametrize("field,value", [("top_k", 5), ("top_p", 0.9)])
def test_filtered_sampling_is_refused_in_ppo_naming_the_field(field, value):
  c = config_lib.ppo_config()
  c.ppo[field] = value
  with pytest.raises(ConfigError, match=rf"config\.ppo\.{field}=.*softmax\(logits / "
                     r"ppo\.temperature\)"):
    config_lib.validate(c)


# ------------------------------------------------ 2. the value model in reward units


@pytest.mark.parametrize("normalize", ["bias", "bias_gain"])
def test_value_model_starts_at_the_normalised_reward(tmp_path, normalize):
  """At step 0, V at a sequence's last token == the normalised score the experience uses."""
  mesh = _mesh()
  tok = helpers.word_tokenizer()
  policy_dir = str(tmp_path / "sft")
  workdir_lib.export(policy_dir, CFG, jax.device_get(
      models.init(CFG, jax.random.PRNGKey(0), kind="causal")), tok, "causal")
  # The RM export path the RM stage runs: its head bias (0.7) is folded into the mean.
  c = config_lib.rm_config()
  c.rm.normalize = normalize
  c.train.batch_size = 4
  params = _scalar_params(1, bias=0.7)
  rng = np.random.default_rng(0)
  ids, mask, last = _batch(rng, b=6)
  loss_mask = (np.arange(ids.shape[1])[None] >= 2).astype(np.int32) * mask
  demos = types.SimpleNamespace(arrays=dict(input_ids=ids, attention_mask=mask,
                                            loss_mask=loss_mask))
  parts = types.SimpleNamespace(model=types.SimpleNamespace(cfg=CFG), mesh=mesh)
  rm_dir = str(tmp_path / "rm")
  rm.export_with_normalization(c, parts, tok, params, rm_dir, demos, stop_ids=[EOS])
  norm = workdir_lib.read_rm_normalization(str(tmp_path / "rm/export/reward_model"))
  assert norm["gain"] == (normalize == "bias_gain") and abs(norm["std"] - 1.0) > 1e-3

  p = config_lib.ppo_config()
  p.task, p.model.init_from, p.ppo.reward_from = "", policy_dir, rm_dir
  m = ppo.load_models(p, mesh, tok)
  ids, mask, last = _batch(rng)
  want, _ = objectives.normalized_scores(m.reward.cfg, m.reward.params, ids, mask, last,
                                         m.normalization)
  # Independent oracle: the raw score of the un-exported RM (with its bias) normalised by
  # the measured constants.
  raw = np.asarray(models.scores(CFG, params, ids, mask, last), np.float64)
  scale = norm["std"] if norm["gain"] else 1.0
  oracle = (raw - (norm["mean"] + 0.7)) / scale
  got = np.asarray(models.scores(m.value.cfg, m.value.params, ids, mask, last))
  np.testing.assert_allclose(np.asarray(want), oracle, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, oracle, rtol=1e-5, atol=1e-5)


# ------------------------------------------- 3. a non-finite iteration leaves β alone


def _tiny_ppo(mesh, kl_controller="adaptive"):
  c = config_lib.ppo_config()
  c.train.batch_size = 8
  p = c.ppo
  p.minibatches, p.epochs, p.max_new_tokens, p.ptx_coef = 2, 1, 4, 0.0
  p.kl_controller, p.kl_coef, p.kl_target, p.kl_horizon = kl_controller, 0.1, 1e-4, 10
  p.iterations = 4
  c.optim.lr = 1e-2
  place = lambda kind, params: model_init.place(mesh, RULES, CFG, kind, params)  # noqa: E731
  policy = jax.device_get(models.init(CFG, jax.random.PRNGKey(0), kind="causal"))
  models_ = ppo.Models(policy=place("causal", policy),
                       value=place("scalar", _scalar_params(1, 0.0)),
                       reward=place("scalar", _scalar_params(2, 0.0)),
                       normalization=dict(workdir_lib.NO_NORMALIZATION), eos_id=EOS,
                       pad_id=PAD, stop_ids=(EOS,))
  return c, ppo.build(c, mesh, models_, use_ptx=False), policy


def _prompts(mesh, b=8, p=6):
  ids = np.random.default_rng(1).integers(4, 14, (b, p)).astype(np.int32)
  return sharding.host_to_global(mesh, dict(input_ids=ids, attention_mask=np.ones_like(ids)))


def test_a_nan_iteration_does_not_move_beta_and_the_next_one_trains():
  mesh = _mesh()
  c, parts, policy = _tiny_ppo(mesh)
  state = parts.init_state()
  batch = _prompts(mesh)
  beta0 = float(state["kl_ctl"]["kl_coef"])
  # A NaN reference model: its log-probs, the KL and every reward are NaN.
  good_ref = parts.models.policy
  parts.models.policy = model_init.place(mesh, RULES, CFG, "causal",
                                         jax.tree.map(lambda x: x * np.nan, policy))
  state, m = ppo.iteration(parts, state, batch, None, jax.random.PRNGKey(0))
  assert not np.isfinite(float(m["kl"]))
  assert int(state["total_skips"]) == 1 and int(state["consecutive_skips"]) == 1
  assert float(state["kl_ctl"]["kl_coef"]) == beta0
  parts.models.policy = good_ref
  before = jax.device_get(state["policy"])
  state, m = ppo.iteration(parts, state, batch, None, jax.random.PRNGKey(1))
  assert int(state["total_skips"]) == 1 and int(state["consecutive_skips"]) == 0
  # β moved exactly as Ziegler et al.'s controller says for the observed KL.
  want = float(losses.adaptive_kl_update(beta0, float(m["kl"]), c.train.batch_size,
                                         c.ppo.kl_target, c.ppo.kl_horizon))
  np.testing.assert_allclose(float(state["kl_ctl"]["kl_coef"]), want, rtol=1e-6)
  assert want != beta0
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
              zip(jax.tree.leaves(jax.device_get(state["policy"])), jax.tree.leaves(before)))
  assert moved > 0


# ---------------------------------------------------- 4. RM normalisation on every row


def test_normalisation_measures_every_demonstration_read_at_the_stop():
  mesh = _mesh()
  params = _scalar_params(3, 0.0)
  rng = np.random.default_rng(2)
  n, t = 11, 12                            # fewer rows than one batch, and a remainder
  ids = rng.integers(10, 14, (n, t)).astype(np.int32)   # no stop id (1, 9) by chance
  lengths = rng.integers(6, t + 1, n)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = ((np.arange(t)[None] >= 3) & (mask > 0)).astype(np.int32)
  stops = []
  for i in range(n):                       # a stop id inside the completion for most rows
    if i % 3:
      stops.append(int(rng.integers(3, lengths[i])))
      ids[i, stops[-1]] = 9 if i % 2 else EOS
      ids[i, stops[-1] + 1:lengths[i]] = EOS    # later stops don't count: the first does
    else:
      stops.append(int(lengths[i] - 1))
  ids = np.where(mask > 0, ids, PAD).astype(np.int32)
  arrays = dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)
  for batch_size in (4, 16):
    got = rm.measure_normalization(CFG, params, mesh, arrays, batch_size, gain=True,
                                   stop_ids=[EOS, 9])
    raw = np.array([float(models.scores(CFG, params, ids[i:i + 1], mask[i:i + 1],
                                        np.array([stops[i]], np.int32))[0]) for i in range(n)])
    assert got["n"] == n
    np.testing.assert_allclose(got["mean"], raw.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["std"], raw.std(), rtol=1e-4)


def test_normalisation_without_demonstrations_is_a_config_error():
  c = config_lib.rm_config()
  c.task = ""
  c.data.train.path = "some/hub_dataset"
  with pytest.raises(ConfigError, match=r"config\.data\.norm\.path=''.*rm\.normalize=none"):
    config_lib.validate(c)
  c.rm.normalize = "none"
  config_lib.validate(c)


def test_too_few_demonstrations_is_an_error(tmp_path):
  c = config_lib.rm_config()
  c.data.norm.path = helpers.write_jsonl(str(tmp_path / "demos.jsonl"),
                                         [dict(prompt="say : a =", completion="a")])
  train = types.SimpleNamespace(format="plain")
  with pytest.raises(UserError, match=r"data\.norm\.path=.*1 usable demonstrations"):
    rm.load_demonstrations(c, helpers.word_tokenizer(), train)


# ------------------------------------------------ 5. + 7. evaluation of what is exported


def test_evaluation_scores_the_exported_ema_policy_with_one_compile():
  mesh = _mesh()
  c, parts, _ = _tiny_ppo(mesh, kl_controller="fixed")
  c.ppo.ema_decay = 0.5
  parts = ppo.build(c, mesh, parts.models, use_ptx=False)
  state = parts.init_state()
  batch = _prompts(mesh)
  state, m = ppo.iteration(parts, state, batch, None, jax.random.PRNGKey(0))
  # tokens_per_sec counts the tokens generated, not batch × max_new_tokens.
  np.testing.assert_allclose(m["tokens_per_sec"] * m["time_generate"],
                             float(m["response_length"]) * 8, rtol=1e-4)
  assert ppo.exported_policy(parts, state) is state["ema"]
  ev = ppo.evaluate(parts, state, [batch], jax.random.PRNGKey(5))
  exp_fn, _ = parts.fns(6)
  assert exp_fn._cache_size() == 1   # evaluation's β=0 did not compile a second copy
  assert set(ev) == {"score", "kl", "raw_policy_score", "raw_policy_kl"}
  # The exported (EMA) policy's own samples and scores, recomputed directly.
  out = ppo.rollout(parts, state["ema"], batch, jax.random.fold_in(jax.random.PRNGKey(5), 10**6))
  _, want = exp_fn(state["ema"], parts.models.policy.params, state["value"],
                   parts.models.reward.params, jnp.float32(0), batch["input_ids"],
                   batch["attention_mask"], out.tokens, out.mask)
  np.testing.assert_allclose(ev["score"], float(want["score"]), rtol=1e-6)
  assert ev["kl"] != ev["raw_policy_kl"]
