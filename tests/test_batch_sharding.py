"""Activations stay split over the batch axes under FSDP (`transformer.constrain_batch`).

Under an `fsdp` mesh axis the embedding lookup `take(embedding [V, D], ids [B, T])` meets
the fsdp axis twice (the table's D and the ids' B). Left to itself XLA's propagation keeps D
split and B whole, so every activation after it was computed for the whole global batch on
every device. The model now constrains its residual stream to `P(batch_axes, None, None)`;
these tests pin that on the 8 fake CPU devices of conftest.py:

- `sharding.activation_batch_spec` picks the batch axes from the mesh (closed-form cases);
- the model finds the mesh while tracing (from its inputs' types or `jax.set_mesh`) and
  traces no constraint at all without one;
- the SFT trainer's own jitted step at fsdp=8 holds the residual stream as [B/8, T, D]
  and no float array of the whole global batch [B, T, ...], forward or backward; its
  per-device temporaries are no bigger than pure data parallelism's (data=8, where the
  batch is split with no conflict: the reference for "activations split 8 ways"), and its
  loss and updated params equal the one-device step;
- KV-cache generation at fsdp=8 decodes [B/8, 1, V] logits and gives the one-device tokens.

Tolerances as in test_scale_out.py: rtol 1e-5 / atol 1e-6 on float32 losses (reordered
sums over sharded dims differ by a few ulps), params atol 1e-2 * lr.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import config as config_lib
from rlhf_jax import models, sampling, sharding
from rlhf_jax.models import transformer
from rlhf_jax.trainers import model_init, sft
from rlhf_jax.trainers import state as state_lib

# vocab 64 and every param dim with a rule divide 8, so fsdp=8 really splits them all.
CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=1, eos_token_id=1,
                                        pad_token_id=0)
V = CFG.vocab_size
B, T = 32, 16
LR = 1e-3
RULES = dict(sharding.DEFAULT_RULES)


def _mesh(**shape):
  if not shape:
    return sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  return sharding.make_mesh(shape)


def _batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V, (B, T)).astype(np.int32)
  lengths = rng.integers(T // 2, T + 1, B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = ((np.arange(T)[None] >= 4) & (mask > 0)).astype(np.int32)
  return dict(input_ids=np.where(mask > 0, ids, 0).astype(np.int32), attention_mask=mask,
              loss_mask=loss_mask)


BATCH = _batch()
PARAMS0 = jax.device_get(models.init(CFG, jax.random.PRNGKey(1)))


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("shape, batch, want", [
    (dict(fsdp=8), 32, P("fsdp", None, None)),
    (dict(data=8), 32, P("data", None, None)),
    (dict(data=2, fsdp=4), 32, P(("data", "fsdp"), None, None)),
    (dict(data=2, fsdp=4), 2, P("data", None, None)),     # fsdp no longer divides 2 / 2
    (dict(data=2, fsdp=4), 6, P("data", None, None)),
    (dict(data=2, fsdp=4), 3, None),                      # odd: nothing divides it
    (dict(fsdp=8), 4, None),
    (dict(fsdp=4, tensor=2), 8, P("fsdp", None, None)),   # tensor is never a batch axis
    (dict(tensor=8), 32, None),
    (dict(), 32, None),                                   # one device
])
def test_activation_batch_spec(shape, batch, want):
  mesh = _mesh(**shape)
  assert sharding.activation_batch_spec(mesh, batch, 3) == want
  assert sharding.activation_batch_spec(mesh.abstract_mesh, batch, 3) == want


def test_activation_batch_spec_skips_manual_axes():
  # Inside a shard_map over fsdp, that axis is Manual: constraining over it would be an error.
  mesh = _mesh(data=2, fsdp=4)
  seen = {}

  def body(x):
    seen["spec"] = sharding.activation_batch_spec(jax.sharding.get_abstract_mesh(), 8, 2)
    return x

  jax.shard_map(body, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"),
                axis_names={"fsdp"})(jnp.zeros((8, 4)))
  assert seen["spec"] == P("data", None)


# ------------------------------------------------------------- finding the mesh in a trace


def _jaxpr_text(fn, *args) -> str:
  return str(jax.make_jaxpr(fn)(*args))


def _logits_fn(p, ids, mask):
  return models.logits(CFG, p, ids, mask)


def test_no_mesh_traces_no_constraint():
  ids, mask = jnp.asarray(BATCH["input_ids"]), jnp.asarray(BATCH["attention_mask"])
  text = _jaxpr_text(_logits_fn, jax.tree.map(jnp.asarray, PARAMS0), ids, mask)
  assert "sharding_constraint" not in text
  assert transformer.trace_mesh(ids) is None


def test_mesh_found_from_inputs_and_from_set_mesh():
  mesh = _mesh(fsdp=8)
  bs = sharding.batch_sharding(mesh, 2)
  shard = state_lib.model_shardings(mesh, CFG, "causal", RULES)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        models.abstract_params(CFG), shard)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bs)
  # Placed inputs (how the trainers' jitted steps see them) carry their mesh.
  assert "sharding_constraint" in _jaxpr_text(_logits_fn, params, ids, ids)
  # Unplaced inputs under `jax.set_mesh`: the context mesh is used.
  plain = jax.ShapeDtypeStruct((B, T), jnp.int32)
  with jax.set_mesh(mesh):
    text = _jaxpr_text(_logits_fn, models.abstract_params(CFG), plain, plain)
  assert "sharding_constraint" in text


# -------------------------------------------------------------- the SFT trainer's own step


def _sft_parts(mesh):
  c = config_lib.sft_config()
  c.optim = ml_collections.ConfigDict(dict(
      lr=LR, warmup_steps=0, schedule="constant", final_lr_frac=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-6, grad_clip=1.0))
  c.train.batch_size, c.train.grad_accum = B, 1
  return sft.build(c, mesh, model_init.place(mesh, RULES, CFG, "causal", PARAMS0),
                   total_steps=10)


def _compiled_sft_step(mesh):
  parts = _sft_parts(mesh)
  bs = sharding.batch_sharding(mesh, 2)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bs) for k, v in BATCH.items()}
  return parts, parts.step_fn.lower(parts.abstract_state(), batch).compile()


@pytest.fixture(scope="module")
def fsdp_step():
  return _compiled_sft_step(_mesh(fsdp=8))


def test_sft_step_activations_split_over_fsdp(fsdp_step):
  hlo = fsdp_step[1].as_text()
  d = CFG.hidden_size
  assert f"f32[{B // 8},{T},{d}]" in hlo        # the per-device residual stream: B / 8 rows
  # No float activation of the whole global batch anywhere, forward or backward (without
  # the constraint: hundreds, e.g. f32[32,16,8], the residual with D split instead of B).
  whole = sorted(set(re.findall(rf"(?:f32|bf16)\[{B},{T}(?:,\d+)*\]", hlo)))
  assert not whole, whole


def test_sft_step_temporaries_match_data_parallel(fsdp_step):
  # data=8 splits the batch with no conflict (params replicated): its temporaries are the
  # activations of B / 8 rows. FSDP adds gathered params (tiny here) on top, so it must
  # be about the same (measured 0.68 vs 0.63 MB); with the batch kept whole it was 1.45 MB.
  fsdp_temp = fsdp_step[1].memory_analysis().temp_size_in_bytes
  data_temp = _compiled_sft_step(_mesh(data=8))[1].memory_analysis().temp_size_in_bytes
  assert fsdp_temp < 1.5 * data_temp, (fsdp_temp, data_temp)


def test_sft_step_fsdp_equals_one_device(fsdp_step):
  parts, compiled = fsdp_step
  new, metrics = compiled(parts.init_state(), sharding.host_to_global(parts.mesh, BATCH))
  ref_parts = _sft_parts(_mesh())
  ref_new, ref_metrics = sft.step(ref_parts, ref_parts.init_state(), BATCH)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), np.asarray(ref_metrics["loss"]),
                             rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=0, atol=1e-2 * LR),
               jax.device_get(new["params"]), jax.device_get(ref_new["params"]))


# ---------------------------------------------------------------------- KV-cache decoding


def test_generate_decodes_split_over_fsdp():
  mesh = _mesh(fsdp=8)
  params = model_init.place(mesh, RULES, CFG, "causal", PARAMS0).params
  prompts = dict(input_ids=BATCH["input_ids"][:, :6], attention_mask=np.ones((B, 6), np.int32))
  placed = sharding.host_to_global(mesh, prompts)
  kwargs = dict(max_new_tokens=4, greedy=True, eos_id=1)
  key = jax.random.PRNGKey(0)
  out = sampling.generate(CFG, params, placed["input_ids"], placed["attention_mask"], key,
                          **kwargs)
  ref = sampling.generate(CFG, jax.tree.map(jnp.asarray, PARAMS0),
                          jnp.asarray(prompts["input_ids"]),
                          jnp.asarray(prompts["attention_mask"]), key, **kwargs)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  repl = sharding.replicated(mesh)
  scalar = lambda d: jax.ShapeDtypeStruct((), d, sharding=repl)  # noqa: E731
  hlo = sampling._generate.lower(   # what `generate` runs, to read its compiled HLO
      CFG, params, placed["input_ids"], placed["attention_mask"], key, scalar(jnp.float32),
      scalar(jnp.float32), jnp.asarray([1], jnp.int32), scalar(jnp.int32), max_new_tokens=4,
      top_k=0, greedy=True, use_top_p=False).compile().as_text()
  assert f"f32[{B // 8},1,{V}]" in hlo
  assert f"f32[{B},1,{V}]" not in hlo
