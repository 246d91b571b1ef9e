"""The pure-function boundary of the models package (see docs/internals.md).

Params are plain nested dicts of float32 arrays. Each function merges them with a cached
abstract graph of `transformer.Model` inside a `jax.jit` whose `cfg` argument is static, so
the functions are cheap to call directly and can equally be called inside an outer
`jax.jit` / `jax.grad` (the inner jit is then simply inlined).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models import transformer
from rlhf_jax.models.config import ModelConfig

Params = dict[str, Any]
KINDS = ("causal", "scalar")


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"model kind={kind!r}: expected one of {KINDS}")


def kind_of(params: Params) -> str:
  """'scalar' if params have a scalar `head`, else 'causal'."""
  if not isinstance(params, dict) or "backbone" not in params:
    raise ValueError("params: expected a dict with a 'backbone' entry (see docs/internals.md)")
  return "scalar" if "head" in params else "causal"


@functools.lru_cache(maxsize=None)
def _graphdef(cfg: ModelConfig, kind: str):
  abstract = nnx.eval_shape(lambda: transformer.Model(cfg, kind, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, state


def _model(cfg: ModelConfig, params: Params) -> transformer.Model:
  graphdef, _ = _graphdef(cfg, kind_of(params))
  return nnx.merge(graphdef, params)


# Below this many params, `init` draws all normal-initialised params with ONE
# jax.random.normal call and slices it: XLA:CPU compiles every threefry call separately,
# which made even a 2-layer test model slow to initialise. Bigger models
# draw one array per distinct shape (stacked over layers), which stays shardable.
_FLAT_INIT_MAX = 2**28


def _init_impl(cfg: ModelConfig, kind: str, rng) -> Params:
  # Same distributions as the modules' own initializers (see transformer.init_rule).
  abstract = abstract_params(cfg, kind)
  flat = flax.traverse_util.flatten_dict(abstract)
  normal_paths = []
  out = {}
  for path, leaf in flat.items():
    rule = transformer.init_rule(path[-1])
    if rule == "normal":
      normal_paths.append(path)
    else:
      out[path] = (jnp.ones if rule == "ones" else jnp.zeros)(leaf.shape, jnp.float32)
  sizes = [math.prod(flat[p].shape) for p in normal_paths]
  if sum(sizes) <= _FLAT_INIT_MAX:
    # The barrier stops XLA from fusing (and so re-compiling) the generator into every slice.
    draws = jax.lax.optimization_barrier(
        transformer.INIT_STD * jax.random.normal(rng, (sum(sizes),), jnp.float32))
    offset = 0
    for path, size in zip(normal_paths, sizes):
      out[path] = draws[offset:offset + size].reshape(flat[path].shape)
      offset += size
  else:
    groups: dict[tuple, list] = collections.defaultdict(list)
    for path in normal_paths:
      groups[tuple(flat[path].shape)].append(path)
    for i, shape in enumerate(sorted(groups)):
      paths = groups[shape]
      draws = transformer.INIT_STD * jax.random.normal(jax.random.fold_in(rng, i),
                                                       (len(paths),) + shape, jnp.float32)
      for j, path in enumerate(paths):
        out[path] = draws[j]
  return flax.traverse_util.unflatten_dict(out)


_init_jit = jax.jit(_init_impl, static_argnums=(0, 1))


def init(cfg: ModelConfig, rng, kind: str = "causal") -> Params:
  """Random float32 params.

  Args:
    cfg: the architecture.
    rng: a `jax.random` key (or an int seed).
    kind: "causal" (LM head) or "scalar" (reward / value head).

  Returns:
    The params dict: {"backbone": ..., "lm_head": ...} or {"backbone": ..., "head": ...}.
  """
  _check_kind(kind)
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  return _init_jit(cfg, kind, rng)


def abstract_params(cfg: ModelConfig, kind: str = "causal") -> Params:
  """The params tree as `jax.ShapeDtypeStruct`s (no allocation)."""
  _check_kind(kind)
  _, state = _graphdef(cfg, kind)
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                      nnx.to_pure_dict(state))


def logical_axes(cfg: ModelConfig, kind: str = "causal") -> Params:
  """Logical axis names per param: the params tree with tuple leaves, e.g. ("vocab", "embed").

  Names come from the `out_sharding` metadata of each `nnx.Param`; unsharded dims are
  None. Note that tuples are pytree nodes for `jax.tree.map`; use
  `is_leaf=lambda x: isinstance(x, tuple)` when mapping over this tree.
  """
  _check_kind(kind)
  _, state = _graphdef(cfg, kind)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return jax.tree.map(lambda p: tuple(p), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_count(params: Params) -> int:
  """Total number of parameters."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


def positions_from_mask(attention_mask):
  """`cumsum(mask) - 1` clipped at 0: left and right padding both work."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _hidden_impl(cfg: ModelConfig, params: Params, input_ids, attention_mask, dropout_rng):
  model = _model(cfg, params)
  t = input_ids.shape[1]
  slots = jnp.arange(t)
  mask_bts = transformer.attention_mask(cfg, slots, slots, attention_mask)
  hidden, _ = model.backbone(input_ids, positions_from_mask(attention_mask), mask_bts,
                             dropout_rng=dropout_rng)
  return model, hidden


@functools.partial(jax.jit, static_argnums=(0,))
def _hidden_jit(cfg, params, input_ids, attention_mask, dropout_rng):
  return _hidden_impl(cfg, params, input_ids, attention_mask, dropout_rng)[1]


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_jit(cfg, params, input_ids, attention_mask, dropout_rng):
  model, hidden = _hidden_impl(cfg, params, input_ids, attention_mask, dropout_rng)
  return model.unembed(hidden)


@functools.partial(jax.jit, static_argnums=(0,))
def _values_jit(cfg, params, input_ids, attention_mask, dropout_rng):
  model, hidden = _hidden_impl(cfg, params, input_ids, attention_mask, dropout_rng)
  return model.score_head(hidden)


@functools.partial(jax.jit, static_argnums=(0,))
def _scores_jit(cfg, params, input_ids, attention_mask, index, dropout_rng):
  model, hidden = _hidden_impl(cfg, params, input_ids, attention_mask, dropout_rng)
  h_bd = jnp.take_along_axis(hidden, index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
  return model.score_head(h_bd)


def _dropout_rng(cfg: ModelConfig, dropout_rng):
  # With both rates 0 the key is dropped here, so the call shares the deterministic
  # compilation (and its exact graph) instead of tracing a second one.
  if cfg.dropout == 0 and cfg.attention_dropout == 0:
    return None
  return dropout_rng


def _require(params: Params, kind: str, fn: str) -> None:
  got = kind_of(params)
  if got != kind:
    raise ValueError(f"models.{fn}: needs {kind} params, got {got} params "
                     f"(keys {sorted(params)})")


def hidden_states(cfg: ModelConfig, params: Params, input_ids, attention_mask, *,
                  dropout_rng=None):
  """Final-norm hidden states [B,T,D] in `cfg.dtype` (either kind of params).

  `dropout_rng` (here and in `logits`, `values`, `scores`): a `jax.random` key turns on
  `cfg.dropout` / `cfg.attention_dropout` for a training step; the masks are a pure
  function of the key. None (the default) is the deterministic forward pass, which is what
  rollouts, scoring and evaluation use. With both rates 0 the key is ignored.
  """
  return _hidden_jit(cfg, params, input_ids, attention_mask, _dropout_rng(cfg, dropout_rng))


def logits(cfg: ModelConfig, params: Params, input_ids, attention_mask, *, dropout_rng=None):
  """Next-token logits.

  Args:
    cfg: the architecture (static).
    params: causal params.
    input_ids: [B,T] int token ids.
    attention_mask: [B,T], 1 = real token; left and/or right padding.
    dropout_rng: None (deterministic) or a key that turns on the config's dropout (see
      `hidden_states`).

  Returns:
    float32 [B,T,V]. Rows at pad positions are finite but meaningless.
  """
  _require(params, "causal", "logits")
  return _logits_jit(cfg, params, input_ids, attention_mask, _dropout_rng(cfg, dropout_rng))


def values(cfg: ModelConfig, params: Params, input_ids, attention_mask, *, dropout_rng=None):
  """Scalar head at every position: float32 [B,T] (value model).

  `dropout_rng` as in `hidden_states`.
  """
  _require(params, "scalar", "values")
  return _values_jit(cfg, params, input_ids, attention_mask, _dropout_rng(cfg, dropout_rng))


def head_values(cfg: ModelConfig, params: Params, hidden):
  """The scalar head on final hidden states [..., D] (e.g. a slice of `hidden_states`).

  Slicing the hidden states to the positions needed and then applying the head can be
  faster than slicing `values(...)` (docs/benchmarks.md compares the two).
  """
  _require(params, "scalar", "head_values")
  return _model(cfg, params).score_head(hidden)


def scores(cfg: ModelConfig, params: Params, input_ids, attention_mask, index, *,
           dropout_rng=None):
  """Scalar head read at `index[b]` (e.g. the last response token): float32 [B].

  `dropout_rng` as in `hidden_states`.
  """
  _require(params, "scalar", "scores")
  return _scores_jit(cfg, params, input_ids, attention_mask, jnp.asarray(index),
                     _dropout_rng(cfg, dropout_rng))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Zeroed KV cache {"layer_i": {"k": [B,K,S,H], "v": [B,K,S,H]}} in `cfg.dtype`.

  K = kv heads, S = `max_len` slots, H = head width. The layout is internal to the models
  package (`forward_with_cache` reads and writes it); callers only pass the dict along.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for i in range(cfg.num_layers)}


@functools.partial(jax.jit, static_argnums=(0,))
def _forward_with_cache_jit(cfg, params, input_ids, positions, kv_mask, cache, cache_index):
  model = _model(cfg, params)
  t = input_ids.shape[1]
  s = kv_mask.shape[1]
  cache_index = jnp.asarray(cache_index, jnp.int32)
  mask_bts = transformer.attention_mask(cfg, cache_index + jnp.arange(t), jnp.arange(s), kv_mask)
  hidden, new_cache = model.backbone(input_ids, positions, mask_bts, cache, cache_index)
  return model.unembed(hidden), new_cache


def forward_with_cache(cfg: ModelConfig, params: Params, input_ids, positions, kv_mask,
                       cache: dict, cache_index):
  """One incremental step (prefill with T = prompt length, then T = 1); never applies dropout.

  Args:
    cfg: the architecture (static).
    params: causal params.
    input_ids: [B,T] new tokens.
    positions: [B,T] their position ids.
    kv_mask: [B,S] 1 where cache slot s holds (or, for the new tokens, will hold) a real token.
    cache: from `init_cache(cfg, B, S)` or a previous call.
    cache_index: scalar (may be traced): the new tokens go to slots [cache_index, cache_index+T).

  Returns:
    (float32 logits [B,T,V], updated cache). A query at slot cache_index+t attends slots
    s <= cache_index+t with kv_mask[b,s] == 1 (and inside the sliding window, if any).
  """
  _require(params, "causal", "forward_with_cache")
  return _forward_with_cache_jit(cfg, params, input_ids, positions, kv_mask, cache, cache_index)


def unembedding(cfg: ModelConfig, params: Params):
  """The LM head as a [D, V] matrix in `cfg.dtype` (the embedding's transpose when tied)."""
  _require(params, "causal", "unembedding")
  if cfg.tie_word_embeddings:
    w_dv = params["backbone"]["embed"]["embedding"].T
  else:
    w_dv = params["lm_head"]["kernel"]
  return w_dv.astype(jnp.dtype(cfg.dtype))


def causal_to_scalar(cfg: ModelConfig, params: Params, rng) -> Params:
  """A reward / value model from a policy: keep `backbone`, add a fresh scalar `head`."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  kernel = transformer._normal(rng, (cfg.hidden_size, 1), jnp.float32)
  return {"backbone": params["backbone"],
          "head": {"kernel": kernel, "bias": jnp.zeros((1,), jnp.float32)}}
