"""PPO's frozen models (the reference policy and the reward model) in the compute dtype.

Issue 16: PPO holds four models; the two it only reads are compute-dtype copies with no
optimiser state and no float32 master, sharded like the policy. The oracles: the dtypes and
bytes the rule implies (matrices 2 bytes a param under bfloat16, the scalar head and vectors
float32), the float32 exports rounded to bfloat16 by `ml_dtypes` in numpy (round to nearest
even, the cast the layers do before every use), and the float32 weights run under bfloat16
compute, which is what the reference and RM were before: log-probs and scores must be equal.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import models, objectives, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import model_init, ppo
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=2, eos_token_id=1,
                                        pad_token_id=0)
NORM = dict(mean=0.3, std=2.0, gain=True, n=10)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A float32 SFT policy and reward model, exported as the stages export them."""
  root = tmp_path_factory.mktemp("ppo-dtypes")
  tok = helpers.word_tokenizer()
  policy = jax.device_get(models.init(CFG, jax.random.PRNGKey(0), kind="causal"))
  reward = jax.device_get(models.init(CFG, jax.random.PRNGKey(1), kind="scalar"))
  workdir_lib.export(str(root / "sft"), CFG, policy, tok, "causal")
  workdir_lib.export(str(root / "rm"), CFG, reward, tok, "scalar", normalization=NORM)
  return dict(sft=str(root / "sft"), rm=str(root / "rm"), tok=tok,
              sft_hf=workdir_lib.resolve_model_dir(str(root / "sft"), "causal"),
              rm_hf=workdir_lib.resolve_model_dir(str(root / "rm"), "scalar"))


def _config(dirs, dtype: str):
  c = config_lib.ppo_config()
  c.task, c.model.init_from, c.ppo.reward_from = "", dirs["sft"], dirs["rm"]
  c.model.dtype = dtype
  c.train.batch_size = 4
  c.ppo.minibatches, c.ppo.max_new_tokens = 2, 4
  return c


def _mesh():
  return sharding.make_mesh(dict(data=1, fsdp=2, tensor=1), devices=jax.devices()[:2])


def _want_dtype(path, x):
  """The rule: matrices in the compute dtype; the scalar head and vectors stay float32."""
  return jnp.float32 if path[0] == "head" or x.ndim < 2 else jnp.bfloat16


def _batch(seed=0, b=4, p=5, n=4):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 60, (b, p + n)).astype(np.int32)
  lengths = rng.integers(1, n + 1, b)
  mask = np.concatenate([np.ones((b, p), np.int32),
                         (np.arange(n)[None] < lengths[:, None]).astype(np.int32)], axis=1)
  return ids, mask, (p - 1 + lengths).astype(np.int32), p


def test_reference_and_reward_model_are_compute_dtype_copies_without_optimizer_state(dirs):
  mesh = _mesh()
  c = _config(dirs, "bfloat16")
  parts = ppo.build(c, mesh, ppo.load_models(c, mesh, dirs["tok"]), use_ptx=False)
  frozen = dict(reference=parts.models.policy, reward=parts.models.reward)
  for name, model in frozen.items():
    flat = flax.traverse_util.flatten_dict(model.params)
    shards = flax.traverse_util.flatten_dict(model.shardings)
    for path, x in flat.items():
      assert x.dtype == _want_dtype(path, x), (name, path, x.dtype)
      assert x.sharding == shards[path], (name, path)   # sharded like before the cast
    # Bytes: 2 per matrix entry + 4 per head / vector entry, counted from the export.
    _, f32 = models.load_hf(dirs["sft_hf" if name == "reference" else "rm_hf"])
    want = sum(x.size * (2 if _want_dtype(p, x) == jnp.bfloat16 else 4)
               for p, x in flax.traverse_util.flatten_dict(f32).items())
    assert sum(x.nbytes for x in flat.values()) == want
  state = parts.init_state()
  # The state holds the two trained models and their optimisers only: no reference, no
  # reward model, and no optimiser state for either.
  assert set(state) == {"step", "rng", "consecutive_skips", "total_skips", "policy",
                        "policy_opt", "value", "value_opt", "kl_ctl"}
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == jnp.float32 for x in floats)   # the masters, their moments
  n_policy = models.param_count(state["policy"])
  assert n_policy == models.param_count(models.load_hf(dirs["sft_hf"])[1])
  # A second build from the built parts would train the bfloat16 reference: refused.
  with pytest.raises(ValueError, match=r"models\.policy holds \['bfloat16', 'float32'\]"):
    ppo.build(c, mesh, parts.models, use_ptx=False)


def test_bfloat16_reference_and_rm_give_the_numbers_of_float32_weights_cast_first(dirs):
  """Tolerance 0: the layers cast each matrix to bfloat16 before use, so the cast-once copy
  and the float32 weights under bfloat16 compute (the old reference) are the same
  computation."""
  mesh = _mesh()
  c = _config(dirs, "bfloat16")
  parts = ppo.build(c, mesh, ppo.load_models(c, mesh, dirs["tok"]), use_ptx=False)
  ref, rm = parts.models.policy, parts.models.reward
  cfg = ref.cfg
  assert cfg.dtype == "bfloat16" and rm.cfg.dtype == "bfloat16"

  def cast_first(params):   # independent: numpy's round-to-nearest-even bfloat16
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({
        p: np.asarray(x).astype(ml_dtypes.bfloat16) if _want_dtype(p, x) == jnp.bfloat16
        else np.asarray(x) for p, x in flat.items()})

  _, f32_policy = models.load_hf(dirs["sft_hf"])
  _, f32_rm = models.load_hf(dirs["rm_hf"])
  for got, f32 in ((ref.params, f32_policy), (rm.params, f32_rm)):
    want = flax.traverse_util.flatten_dict(cast_first(f32))
    for path, x in flax.traverse_util.flatten_dict(jax.device_get(got)).items():
      assert x.dtype == want[path].dtype
      np.testing.assert_array_equal(np.asarray(x, np.float32),
                                    np.asarray(want[path], np.float32), err_msg=str(path))

  # Both oracles placed with the same shardings (the bfloat16 sums of a split contraction
  # depend on the split): the numpy-cast copy, and the float32 reference of old.
  rules = state_lib.parse_rules("")
  on_mesh = lambda kind, params: model_init.place(mesh, rules, cfg, kind, params).params  # noqa
  ids, mask, last, p = _batch()
  temperature = float(c.ppo.temperature)
  got = objectives.response_logprobs(cfg, ref.params, ids, mask, p, temperature)
  cast = objectives.response_logprobs(cfg, on_mesh("causal", cast_first(f32_policy)), ids,
                                      mask, p, temperature)
  old = objectives.response_logprobs(cfg, on_mesh("causal", f32_policy), ids, mask, p,
                                     temperature)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(cast))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(old))
  assert np.all(np.isfinite(np.asarray(got))) and np.all(np.asarray(got) < 0)
  got_s, _ = objectives.normalized_scores(rm.cfg, rm.params, ids, mask, last, NORM)
  old_s, _ = objectives.normalized_scores(rm.cfg, on_mesh("scalar", f32_rm), ids, mask, last,
                                         NORM)
  np.testing.assert_array_equal(np.asarray(got_s), np.asarray(old_s))


def test_float32_compute_keeps_the_models_as_they_are(dirs):
  """On a CPU (`model.dtype=auto` -> float32) nothing is cast or copied: the numbers of old."""
  mesh = _mesh()
  c = _config(dirs, "float32")
  m = ppo.load_models(c, mesh, dirs["tok"])
  parts = ppo.build(c, mesh, m, use_ptx=False)
  assert parts.models.policy is m.policy            # the reference is the loaded policy
  assert model_init.frozen(m.reward) is m.reward
  for x in jax.tree.leaves((m.policy.params, m.reward.params)):
    assert x.dtype == jnp.float32
