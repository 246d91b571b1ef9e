"""The device mesh, logical-axis rules, and placing params and batches on the mesh.

Params name their dims with logical axes (`("vocab", "embed")`); a small rules table maps
each logical name to a mesh axis of the `('data', 'fsdp', 'tensor')` mesh. Params are born
sharded (`jax.eval_shape` -> shardings -> `jax.jit(init, out_shardings=...)`), so a model
bigger than one device never lands whole on one. Batches are split along dim 0 over
`('data', 'fsdp')`; each host feeds only its own slice (`host_to_global`).

Meshes use `AxisType.Auto` axes: jitted functions take explicit `in_shardings` /
`out_shardings` and XLA's GSPMD propagation shards everything in between.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated).
DEFAULT_RULES: dict = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "length": None,
    "layers": None,
}


def _is_axes_leaf(x) -> bool:
  """Leaves of a logical-axes tree: a tuple of names (a pytree node otherwise) or None."""
  return x is None or isinstance(x, tuple)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh from sizes per axis.

  Args:
    shape: mesh axis name -> size; missing axes are 1 and one axis may be -1 ("the rest").
      The sizes must multiply to the number of devices.
    devices: devices to use (default: all global devices, `jax.devices()`); pass e.g.
      `jax.devices()[:1]` for a one-device mesh.

  Returns:
    A `jax.sharding.Mesh` with Auto axis types, axes in `MESH_AXES` order.

  Raises:
    ValueError: an unknown axis, a bad size, or sizes that don't fit the device count;
      the message names the offending field (e.g. `mesh.fsdp=3`).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis; expected axes {MESH_AXES}")
  sizes = {}
  for name in MESH_AXES:
    size = shape.get(name, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
        size < 1 and size != -1):
      raise ValueError(f"mesh.{name}={size!r}: expected a positive int or -1 (the rest)")
    sizes[name] = int(size)
  rest = [k for k, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh.{rest[1]}=-1: only one mesh axis may be -1 (mesh.{rest[0]} "
                     "already is)")
  described = ", ".join(f"{k}={v}" for k, v in sizes.items())
  fixed = 1
  for name, size in sizes.items():
    if size == -1:
      continue
    if n % (fixed * size):
      raise ValueError(
          f"mesh.{name}={size} does not fit: the mesh ({described}) needs the product of "
          f"its sizes to divide the {n} available devices")
    fixed *= size
  if rest:
    sizes[rest[0]] = n // fixed
  elif fixed != n:
    raise ValueError(
        f"mesh ({described}) covers {fixed} devices but {n} are available: make the sizes "
        "multiply to the device count or set one axis to -1 (the rest)")
  axis_sizes = tuple(sizes[k] for k in MESH_AXES)
  return jax.make_mesh(axis_sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _mesh_axes_of(rule) -> tuple:
  if rule is None:
    return ()
  if isinstance(rule, str):
    return (rule,)
  return tuple(rule)


def _spec_for(path, names, rules, shape, mesh) -> PartitionSpec:
  if names is None:
    return PartitionSpec()
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"{jax.tree_util.keystr(path)}: logical axes {names} name "
                     f"{len(names)} dims but the array has shape {tuple(shape)}")
  used: set = set()
  entries = []
  for i, name in enumerate(names):
    if name is None:
      entries.append(None)
      continue
    if name not in rules:
      raise ValueError(f"{jax.tree_util.keystr(path)}: logical axis {name!r} has no "
                       f"sharding rule; known: {sorted(rules)}")
    kept, product = [], 1
    for axis in _mesh_axes_of(rules[name]):
      if axis in used:  # a mesh axis shards at most one dim of an array
        continue
      if mesh is not None:
        if axis not in mesh.shape:
          raise ValueError(f"sharding rule {name!r} -> {axis!r}: not a mesh axis "
                           f"{tuple(mesh.shape)}")
        if shape is not None and shape[i] % (product * mesh.shape[axis]):
          continue  # dim not divisible: leave it unsharded over this axis
        product *= mesh.shape[axis]
      kept.append(axis)
    used.update(kept)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*entries)


def logical_to_specs(axes_tree: Any, rules: Mapping[str, Any] = DEFAULT_RULES,
                     shapes_tree: Any = None, mesh: Optional[Mesh] = None) -> Any:
  """Logical axis names -> a tree of `PartitionSpec`s.

  A mesh axis is used at most once per spec (later repeats are dropped). With `shapes_tree`
  and `mesh`, a dim whose size is not divisible by a mesh axis's size is not sharded over
  it (so tiny test models with e.g. vocab 100 still shard the rest).

  Args:
    axes_tree: a tree whose leaves are tuples of logical names (None = unsharded dim), or
      None for a fully replicated leaf (e.g. `models.logical_axes(cfg)`).
    rules: logical name -> mesh axis name, tuple of names, or None.
    shapes_tree: optional tree of the same structure with arrays / ShapeDtypeStructs.
    mesh: the mesh (required with `shapes_tree`).

  Returns:
    A tree of `PartitionSpec` with the structure of `axes_tree`.
  """
  if shapes_tree is not None and mesh is None:
    raise ValueError("logical_to_specs: shapes_tree needs the mesh to check divisibility")
  if shapes_tree is None:
    return jax.tree_util.tree_map_with_path(
        lambda p, names: _spec_for(p, names, rules, None, mesh), axes_tree,
        is_leaf=_is_axes_leaf)
  return jax.tree_util.tree_map_with_path(
      lambda p, names, x: _spec_for(p, names, rules, tuple(x.shape), mesh),
      axes_tree, shapes_tree, is_leaf=_is_axes_leaf)


def named_shardings(mesh: Mesh, specs: Any) -> Any:
  """A tree of `PartitionSpec` -> the same tree of `NamedSharding` on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(mesh: Mesh, init_fn: Callable[[], Any], axes_tree: Any,
                 rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
  """Runs `init_fn()` so that its outputs are born sharded on `mesh`.

  Args:
    mesh: the device mesh.
    init_fn: a no-argument function returning the params tree (close over the rng).
    axes_tree: logical axes of the params (same structure, tuple leaves).
    rules: the logical -> mesh axis table.

  Returns:
    The params tree as global `jax.Array`s with the shardings from the rules.
  """
  shapes = jax.eval_shape(init_fn)
  specs = logical_to_specs(axes_tree, rules, shapes_tree=shapes, mesh=mesh)
  return jax.jit(init_fn, out_shardings=named_shardings(mesh, specs))()


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh` (scalars, rng, counters)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Dim 0 split over `('data', 'fsdp')`, the other `ndim - 1` dims replicated."""
  if ndim == 0:
    return replicated(mesh)
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def activation_batch_spec(mesh, batch: int, ndim: int) -> Optional[PartitionSpec]:
  """`P(batch_axes, None, ...)` for an activation of `ndim` dims whose dim 0 has `batch` rows.

  `batch_axes` are the `BATCH_AXES` of `mesh` (a `Mesh` or the `AbstractMesh` seen while
  tracing) of size > 1 and Auto type (not Manual inside a shard_map, nor Explicit), each
  kept, in order, if the product of the axes kept so far and its size divides `batch`.
  None when no axis qualifies (one device, a tensor-only mesh, a batch of 1): then there is
  nothing to constrain.
  """
  abstract = mesh.abstract_mesh
  kept, product = [], 1
  for axis in BATCH_AXES:
    size = abstract.shape.get(axis, 1)
    if size > 1 and axis in abstract.auto_axes and batch % (product * size) == 0:
      kept.append(axis)
      product *= size
  if not kept:
    return None
  return PartitionSpec(tuple(kept) if len(kept) > 1 else kept[0], *([None] * (ndim - 1)))


def batch_shards(mesh: Mesh) -> int:
  """How many ways dim 0 of a batch is split (global batch sizes must be a multiple)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def host_to_global(mesh: Mesh, local_tree: Any) -> Any:
  """Each host's slice of the batch (along dim 0) -> global `jax.Array`s.

  Every process passes its own local rows (same shapes on all processes); the global
  batch is their concatenation in process order, split over `('data', 'fsdp')`. Where
  the batch axes do not span processes (e.g. a `tensor` axis across hosts), hosts that
  share a batch shard must pass the same rows. Scalars are replicated (they must be equal
  on all processes). On one process this is a sharded `device_put`.

  Args:
    mesh: the device mesh.
    local_tree: a tree of numpy (or array-like) leaves, this host's rows.

  Returns:
    The same tree of global arrays (dim 0 = local rows x number of distinct batch slices
    across processes; x process count in the usual case).
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if x.ndim == 0:
      return jax.make_array_from_process_local_data(sharding, x, x.shape)
    try:  # the global shape is inferred from how many batch shards this host holds
      return jax.make_array_from_process_local_data(sharding, x)
    except ValueError as e:
      raise ValueError(
          f"a local batch of {x.shape[0]} rows on process {jax.process_index()} does not "
          f"split over this host's share of the {batch_shards(mesh)} ('data', 'fsdp') "
          f"shards of the mesh {dict(mesh.shape)}: {e}") from None
  return jax.tree.map(put, local_tree)


def per_device_bytes(tree: Any) -> int:
  """Max over devices of the bytes of this tree's shards held on that device."""
  per_device: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)
