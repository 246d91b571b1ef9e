"""The train-state pytree: its shardings, its birth on the mesh, and guarded updates.

A run's whole state is one dict pytree (step, params, optimiser state, rng, skip counters and
whatever a stage adds), so one orbax checkpoint captures it and one jitted step takes and
returns it with explicit shardings and donation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models, sharding


def parse_rules(text: str) -> dict:
  """`config.sharding_rules` ("embed=fsdp,vocab=") -> overrides of sharding.DEFAULT_RULES."""
  rules = dict(sharding.DEFAULT_RULES)
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      from rlhf_jax.errors import ConfigError
      raise ConfigError("sharding_rules", text, "comma-separated logical=mesh_axis pairs")
    name, axis = (s.strip() for s in item.split("=", 1))
    rules[name] = axis or None
  return rules


def model_shardings(mesh, cfg, kind: str, rules: dict, shapes=None):
  """NamedShardings for a model's params from its logical axes and the rules table."""
  axes = models.logical_axes(cfg, kind=kind)
  if shapes is None:
    shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.PRNGKey(0), kind=kind))
  specs = sharding.logical_to_specs(axes, rules, shapes_tree=shapes, mesh=mesh)
  return sharding.named_shardings(mesh, specs)


def lora_shardings(mesh, cfg, spec, kind: str, rules: dict):
  """NamedShardings of a LoRA trainable tree (`models.lora.init_trainable`): A like its
  kernel's input dims, B like its output dims, a scalar head like the model's."""
  from rlhf_jax.models import lora
  axes = lora.trainable_axes(cfg, spec, kind)
  shapes = jax.eval_shape(lambda p: lora.init_trainable(cfg, p, spec, jax.random.PRNGKey(0)),
                          models.abstract_params(cfg, kind))
  specs = sharding.logical_to_specs(axes, rules, shapes_tree=shapes, mesh=mesh)
  return sharding.named_shardings(mesh, specs)


def lora_trainable(mesh, cfg, params, spec, rules: dict, seed: int, offset: int = 0):
  """(fresh LoRA trainable tree of `params` born sharded, its shardings); the factors' key
  is derived from `seed` and `offset` (one per model of a stage)."""
  from rlhf_jax.models import lora
  shard = lora_shardings(mesh, cfg, spec, models.kind_of(params), rules)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x10AA + offset)
  trainable = jax.jit(lambda p: lora.init_trainable(cfg, p, spec, key),
                      out_shardings=shard)(params)
  return trainable, shard


def opt_shardings(mesh, tx, abstract_params, params_shardings):
  """Optimiser-state shardings: moments follow their params, counters are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, params_shardings,
      transform_non_params=lambda _: repl)


def place(tree, shardings):
  """Host arrays -> global jax.Arrays with the given shardings (multi-host safe)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def scalar_state(seed: int) -> dict:
  """The fields every stage's state has besides params and optimiser state."""
  return dict(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(seed),           # raw uint32[2]: checkpoints as a plain array
      consecutive_skips=jnp.zeros((), jnp.int32),
      total_skips=jnp.zeros((), jnp.int32),
  )


def all_finite(*trees) -> jax.Array:
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def guarded(old_state: dict, new_state: dict, finite: jax.Array) -> dict:
  """Keeps `old_state` (but advances step and counts the skip) when the update is non-finite.

  A NaN/inf loss or gradient never reaches params or optimiser moments; the host loop stops
  the run after `train.max_consecutive_skips` skips in a row.
  """
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old_state)
  kept["step"] = old_state["step"] + 1
  kept["rng"] = new_state["rng"]
  kept["consecutive_skips"] = jnp.where(finite, 0, old_state["consecutive_skips"] + 1)
  kept["total_skips"] = old_state["total_skips"] + (1 - finite.astype(jnp.int32))
  return kept


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying shardings: the target orbax restores into."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_shardings_like(state) -> dict:
  return jax.tree.map(lambda x: x.sharding, state)


def build(mesh, seed: int, models_and_optimizers: dict):
  """Shardings and (init, abstract) functions of a state holding trainable models.

  Args:
    mesh: the device mesh.
    seed: rng seed of the fresh state.
    models_and_optimizers: {name: (params, params_shardings, tx)}; the state holds
      `name` -> params and `name + "_opt"` -> that optimiser's state ("params"/"opt_state"
      for the single-model stages).

  Returns:
    (shardings, init_state, abstract_state).
  """
  from rlhf_jax import sharding as sharding_lib
  shardings = {k: sharding_lib.replicated(mesh) for k in scalar_state(0)}
  for name, (params, p_shard, tx) in models_and_optimizers.items():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings[name] = p_shard
    shardings[_opt_key(name)] = opt_shardings(mesh, tx, abstract, p_shard)

  def init_state():
    fresh = scalar_state(seed)
    for name, (params, _, tx) in models_and_optimizers.items():
      fresh[name] = params
      fresh[_opt_key(name)] = jax.jit(tx.init, out_shardings=shardings[_opt_key(name)])(params)
    return jax.device_put(fresh, {k: shardings[k] for k in fresh})

  def abstract_state():
    return abstract_with_shardings(jax.eval_shape(init_state), shardings)

  return shardings, init_state, abstract_state


def _opt_key(name: str) -> str:
  return "opt_state" if name == "params" else f"{name}_opt"
