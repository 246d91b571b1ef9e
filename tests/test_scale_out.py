"""Scale-out: the trainers' own jitted steps (their `build`) give the same numbers on every mesh.

With the 8 fake CPU devices of conftest.py, one SFT step, one RM step and one PPO update
(experience + epochs × minibatches) run on the (8,1,1), (2,4,1), (2,2,2) and (1,4,2) meshes
and on a 1-device mesh; the losses / metrics and the whole updated state (params and Adam
moments) must agree, and under FSDP / tensor parallelism the params and optimiser state
must really be split. Sharded greedy `generate` must equal unsharded, and an SFT step in
bf16 compute with remat must stay close to float32 (params stay float32 master weights).

The oracle is the 1-device run of the same code: sharding must not change the maths, only
the order of floating-point reductions. Tolerance: rtol 1e-5 / atol 1e-6 for float32 losses,
metrics, experience and Adam moments. Reordered sums over the sharded dims (embed 64, mlp
128, batch) change results by a few ulps (float32 eps = 1.2e-7, so a few 1e-7 relative).
Updated params get atol 1e-5 = 1 % of lr: the first Adam step moves a param by
lr · g / (|g| + eps) ≈ ±lr, which turns the ulp-level noise of a gradient entry that cancels
to ~0 (e.g. the RM's bias, to which the ranking loss is invariant) into up to ~0.3 % of an
update; a wrong collective (a missing psum, a gradient summed twice) is off by O(lr) on
every entry. One layer of the tiny Llama keeps the compile count cheap: every layer is
sharded the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import models, sampling, sharding
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import batching, model_init, ppo, rm, sft
from rlhf_jax.trainers import state as state_lib

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
RTOL, ATOL = 1e-5, 1e-6
LR = 1e-3
PARAM_ATOL = 1e-2 * LR
# vocab 64 divides every mesh axis here, so every param dim that has a rule is split.
CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=1, eos_token_id=1,
                                        pad_token_id=0)
PARAM_KEYS = ("params", "policy", "value")
RULES = dict(sharding.DEFAULT_RULES)
EOS, PAD = 1, 0
B_SFT, T_SFT, ACCUM = 16, 16, 2        # microbatches of 8 rows: one per batch shard
B_RM, K_RM, T_RM = 8, 3, 12
B_PPO, P_PPO, N_PPO, PTX_ROWS = 16, 8, 6, 8   # 2 minibatches of 8, ptx 4 rows each


def _mesh(shape):
  if shape == (1, 1, 1):
    return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


def _optim_cfg():
  # Constant lr, no warmup: the first step really moves the params. Adam's eps is 1e-6
  # (not 1e-8): the first Adam step is lr · g / (|g| + eps), so for a gradient entry that
  # cancels to ~1e-8 (where reordered float32 sums differ by O(1) relatively) eps bounds
  # how much an ulp-level difference in g is amplified in the update.
  return ml_collections.ConfigDict(dict(
      lr=LR, warmup_steps=0, schedule="constant", final_lr_frac=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-6, grad_clip=1.0))


def _ppo_cfg():
  p = config_lib.ppo_config().ppo
  p.minibatches, p.epochs, p.ptx_coef, p.ptx_batch_size = 2, 2, 1.0, PTX_ROWS
  p.no_eos_penalty, p.kl_coef, p.value_lr_scale = 0.5, 0.05, 0.5
  p.max_new_tokens = N_PPO
  return p


def _host_params(cfg, kind, seed):
  return jax.device_get(models.init(cfg, jax.random.PRNGKey(seed), kind=kind))


def _to_host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ------------------------------------------------------------------------------ data


def _sft_batch(rng):
  ids = rng.integers(3, CFG.vocab_size, (B_SFT, T_SFT)).astype(np.int32)
  lengths = rng.integers(T_SFT // 2, T_SFT + 1, B_SFT)
  mask = (np.arange(T_SFT)[None] < lengths[:, None]).astype(np.int32)   # right padded
  ids = np.where(mask > 0, ids, PAD).astype(np.int32)
  loss_mask = ((np.arange(T_SFT)[None] >= 4) & (mask > 0)).astype(np.int32)
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)


def _rm_batch(rng):
  ids = rng.integers(3, CFG.vocab_size, (B_RM, K_RM, T_RM)).astype(np.int32)
  lengths = rng.integers(5, T_RM + 1, (B_RM, K_RM))
  mask = (np.arange(T_RM)[None, None] < lengths[..., None]).astype(np.int32)
  ids = np.where(mask > 0, ids, PAD).astype(np.int32)
  ranks = np.stack([rng.permutation(K_RM) for _ in range(B_RM)]).astype(np.int32)
  valid = np.ones((B_RM, K_RM), bool)
  valid[0, 2] = False                                   # a prompt with only 2 responses
  return dict(input_ids=ids, attention_mask=mask, last_index=(lengths - 1).astype(np.int32),
              ranks=ranks, valid=valid)


def _ppo_data(rng):
  """Left-padded prompts, sampled-looking responses (EOS then padding) and a ptx batch."""
  lengths = rng.integers(2, P_PPO + 1, B_PPO)
  pmask = (np.arange(P_PPO)[None] >= (P_PPO - lengths)[:, None]).astype(np.int32)
  pids = np.where(pmask > 0, rng.integers(3, CFG.vocab_size, (B_PPO, P_PPO)), PAD)
  tokens = rng.integers(3, CFG.vocab_size, (B_PPO, N_PPO))
  stop = rng.integers(0, N_PPO + 2, B_PPO)              # >= N_PPO: no EOS in this row
  for b in range(B_PPO):
    if stop[b] < N_PPO:
      tokens[b, stop[b]] = EOS
      tokens[b, stop[b] + 1:] = PAD
  rmask = (np.arange(N_PPO)[None] <= np.minimum(stop, N_PPO - 1)[:, None]).astype(np.int32)
  prompts = dict(input_ids=pids.astype(np.int32), attention_mask=pmask,
                 tokens=tokens.astype(np.int32), response_mask=rmask)
  ptx_ids = rng.integers(3, CFG.vocab_size, (PTX_ROWS * 2, 12)).astype(np.int32)
  ptx = dict(input_ids=ptx_ids, attention_mask=np.ones_like(ptx_ids),
             loss_mask=np.ones_like(ptx_ids))
  return prompts, ptx


DATA_RNG = np.random.default_rng(0)
SFT_BATCH = _sft_batch(DATA_RNG)
RM_BATCH = _rm_batch(DATA_RNG)
PPO_PROMPTS, PTX_BATCH = _ppo_data(DATA_RNG)
POLICY0 = _host_params(CFG, "causal", 1)
SCALAR0 = _host_params(CFG, "scalar", 2)
REWARD0 = _host_params(CFG, "scalar", 3)


# ------------------------------------------------------------------- one step per stage


def _stage_config(make, batch_size: int, grad_accum: int = 1):
  c = make()
  c.optim = _optim_cfg()
  c.train.batch_size, c.train.grad_accum = batch_size, grad_accum
  return c


def _model(mesh, cfg, kind, params0):
  return model_init.place(mesh, RULES, cfg, kind, params0)


def run_sft(mesh, cfg=CFG):
  parts = sft.build(_stage_config(config_lib.sft_config, B_SFT, ACCUM), mesh,
                    _model(mesh, cfg, "causal", POLICY0), total_steps=10)
  return sft.step(parts, parts.init_state(), SFT_BATCH)


def run_rm(mesh):
  parts = rm.build(_stage_config(config_lib.rm_config, B_RM), mesh,
                   _model(mesh, CFG, "scalar", SCALAR0), total_steps=10)
  return rm.step(parts, parts.init_state(), RM_BATCH)


def run_ppo(mesh):
  c = _stage_config(config_lib.ppo_config, B_PPO)
  c.ppo = _ppo_cfg()
  models = ppo.Models(policy=_model(mesh, CFG, "causal", POLICY0),
                      value=_model(mesh, CFG, "scalar", SCALAR0),
                      reward=_model(mesh, CFG, "scalar", REWARD0),
                      normalization=dict(mean=0.25, std=2.0, gain=True), eos_id=EOS,
                      pad_id=PAD, stop_ids=(EOS,))
  parts = ppo.build(c, mesh, models, use_ptx=True)
  st = parts.init_state()
  exp_fn, update_fn = parts.fns(P_PPO)
  batch = sharding.host_to_global(mesh, PPO_PROMPTS)
  exp, exp_metrics = exp_fn(st["policy"], models.policy.params, st["value"],
                            models.reward.params, st["kl_ctl"]["kl_coef"],
                            batch["input_ids"], batch["attention_mask"], batch["tokens"],
                            batch["response_mask"])
  exp_host = _to_host(exp)
  new, metrics = update_fn(st, exp, sharding.host_to_global(mesh, PTX_BATCH),
                           jax.random.PRNGKey(7))
  return new, dict(exp_metrics, **metrics), exp_host


@pytest.fixture(scope="module")
def reference():
  """The 1-device results every mesh must reproduce."""
  mesh = _mesh((1, 1, 1))
  out = {}
  for name, fn in (("sft", run_sft), ("rm", run_rm)):
    new, metrics = fn(mesh)
    out[name] = (_to_host(new), _to_host(metrics))
  new, metrics, exp = run_ppo(mesh)
  out["ppo"] = (_to_host(new), _to_host(metrics), exp)
  return out


def _assert_trees_close(got, want, what):
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want), what
  for (path, a), b in zip(flat_got, flat_want):
    is_param = getattr(path[0], "key", None) in PARAM_KEYS
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL,
                               atol=PARAM_ATOL if is_param else ATOL,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _model_shards(shape) -> int:
  """How many ways a 2-D weight with an `embed` and a tensor-ruled dim is split."""
  return shape[1] * shape[2]


def _assert_split(tree, shape, what):
  """Per-device bytes ≈ total / (fsdp · tensor) (norm scales and counters are tiny)."""
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  per_device = sharding.per_device_bytes(tree)
  shards = _model_shards(shape)
  if shards == 1:
    assert per_device == total, what                      # pure data parallel: replicated
  else:
    # Norm scales have only `embed` (split by fsdp alone), Adam counts are replicated.
    assert per_device <= total / shards * 1.05 + 64, (what, per_device, total, shards)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_one_step_of_each_stage_matches_one_device(shape, reference):
  mesh = _mesh(shape)
  for name, fn, keys in (("sft", run_sft, ("params", "opt_state")),
                         ("rm", run_rm, ("params", "opt_state"))):
    new, metrics = fn(mesh)
    ref_state, ref_metrics = reference[name]
    _assert_trees_close(_to_host(metrics), ref_metrics, f"{name} metrics")
    _assert_trees_close(_to_host(new), ref_state, f"{name} state")
    assert int(new["step"]) == 1 and int(new["total_skips"]) == 0
    # The step really moved the params (so "equal" is not "both unchanged").
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(ref_state["params"]),
        jax.tree.leaves(POLICY0 if name == "sft" else SCALAR0)))
    assert moved > 100 * ATOL, name
    for key in keys:
      _assert_split(new[key], shape, f"{name}.{key}")

  new, metrics, exp = run_ppo(mesh)
  ref_state, ref_metrics, ref_exp = reference["ppo"]
  _assert_trees_close(exp, ref_exp, "ppo experience")
  _assert_trees_close(_to_host(metrics), ref_metrics, "ppo metrics")
  _assert_trees_close(_to_host(new), ref_state, "ppo state")
  assert int(new["total_skips"]) == 0
  for key in ("policy", "policy_opt", "value", "value_opt"):
    _assert_split(new[key], shape, f"ppo.{key}")


def test_params_really_split_by_the_rules():
  """Exact per-device bytes on (1,4,2): a weight with embed × (mlp|heads|vocab) is 1/8."""
  mesh = _mesh((1, 4, 2))
  shardings = state_lib.model_shardings(mesh, CFG, "causal", RULES)
  params = state_lib.place(POLICY0, shardings)
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    shards = int(np.prod([np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)])
                          for s in spec if s is not None] or [1]))
    assert {s.data.nbytes for s in x.addressable_shards} == {x.nbytes // shards}, \
        jax.tree_util.keystr(path)
    if x.ndim == 2:   # every matrix has an embed dim and a tensor-ruled dim
      assert shards == 8, (jax.tree_util.keystr(path), x.sharding.spec)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_greedy_generate_equals_unsharded(shape):
  ids, mask = PPO_PROMPTS["input_ids"], PPO_PROMPTS["attention_mask"]
  key = jax.random.PRNGKey(0)
  want = sampling.generate(CFG, POLICY0, ids, mask, key, max_new_tokens=8, greedy=True,
                           eos_id=EOS, pad_id=PAD)
  mesh = _mesh(shape)
  params = state_lib.place(POLICY0, state_lib.model_shardings(mesh, CFG, "causal", RULES))
  batch = sharding.host_to_global(mesh, dict(ids=ids, mask=mask))
  assert batch["ids"].sharding.spec[0] == sharding.BATCH_AXES
  got = sampling.generate(CFG, params, batch["ids"], batch["mask"], key, max_new_tokens=8,
                          greedy=True, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs),
                             rtol=RTOL, atol=1e-5)
  assert len(set(np.asarray(want.tokens).ravel().tolist())) > 3   # not a degenerate output


def test_bf16_compute_with_remat_is_close_to_float32(reference):
  """`model.dtype=bfloat16` + `model.remat=True`: fp32 master weights, close to fp32 step."""
  mesh = _mesh((2, 2, 2))
  new, metrics = run_sft(mesh, CFG.replace(dtype="bfloat16", remat=True))
  ref_state, ref_metrics = reference["sft"]
  for tree in (new["params"], new["opt_state"]):
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(tree))
  # bf16 has an 8-bit mantissa (eps 7.8e-3): the loss is a mean over ~100 tokens of
  # log-softmax in float32 of bf16 logits, so it agrees to ~1e-2 relative.
  np.testing.assert_allclose(float(metrics["loss"]), ref_metrics["loss"], rtol=1e-2)
  np.testing.assert_allclose(float(metrics["grad_norm"]), ref_metrics["grad_norm"], rtol=5e-2)
  # The update (≈ -lr · sign(grad) on the first Adam step) points the same way.
  got = np.concatenate([(np.asarray(a) - b).ravel() for a, b in zip(
      jax.tree.leaves(new["params"]), jax.tree.leaves(POLICY0))])
  want = np.concatenate([(a - b).ravel() for a, b in zip(
      jax.tree.leaves(ref_state["params"]), jax.tree.leaves(POLICY0))])
  cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
  assert cos > 0.9, cos


def test_a_batch_that_does_not_split_is_a_config_error():
  mesh = _mesh((2, 2, 2))
  batching.check_batch_split(mesh, 8)
  with pytest.raises(ConfigError, match=r"train.batch_size=6: expected a multiple of the "
                     r"mesh's data x fsdp = 4 batch shards"):
    batching.check_batch_split(mesh, 6)
