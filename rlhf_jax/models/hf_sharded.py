"""Load an HF checkpoint straight into sharded global arrays, each device reading its slice.

`hf.load_hf` reads every tensor onto the host, so a model must fit one host's RAM before it
is placed on the mesh. `load_hf_sharded(path, shardings_for)` builds each param with
`jax.make_array_from_callback`: for every device's index the callback reads only the block
of the stored tensor that index needs (safetensors reads by offset), in the stored dtype,
and converts that block to float32. A process then holds about its share of the model plus
at most one tensor's block; the callbacks of one process never talk to other processes.

The name mapping and layout transforms stay in one place: `hf._entries`. Its `to_ours`
functions only split dims (reshape), transpose, split along an axis and index, so each of
our params is a strided view of the stored tensor. We find that view's strides by applying
`to_ours` to zero-memory "coordinate" arrays (`np.broadcast_to` of an arange along each
stored dim): the view's element at our index t holds the stored coordinate
`offset_k + sum_i coef[k][i] * t_i`, and `offset`, `coef` are read off the view's first
element and its strides. A slice of ours then maps to a box of the stored tensor (its first
and last coordinates) and, within the box, to a strided view (`as_strided`).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from rlhf_jax.models import api
from rlhf_jax.models import hf
from rlhf_jax.models.config import ModelConfig

def _affine_map(to_ours: Callable, stored_shape: tuple, j: int) -> tuple[list, list]:
  """(offset[k], coef[k][i]): stored coordinate k of our element t = offset + coef . t.

  Raises:
    RuntimeError: `to_ours` copied instead of viewing (it would not be affine); a bug in
      `hf._entries`, which these transforms must keep to reshapes that split dims,
      transposes, splits and indexing.
  """
  offsets, coefs = [], []
  nd = len(stored_shape)
  for k, size in enumerate(stored_shape):
    base = np.arange(size, dtype=np.int64)
    coord = np.broadcast_to(base.reshape([size if a == k else 1 for a in range(nd)]),
                            stored_shape)
    ours = to_ours(coord)[j]
    if not np.may_share_memory(ours, base):
      raise RuntimeError(f"hf._entries transform of a {stored_shape} tensor copies; "
                         "the sharded loader needs views (split, transpose, index)")
    offsets.append(int(ours[(0,) * ours.ndim]))
    coefs.append([st // ours.itemsize if n > 1 else 0 for st, n in zip(ours.strides, ours.shape)])
  return offsets, coefs


def _bounds(index: tuple, shape: tuple) -> list[tuple[int, int]]:
  """A device's index (slices, possibly open) -> (start, stop) per dim."""
  out = []
  for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"unexpected strided shard index {index}")
    out.append((start, stop))
  return out


class _Reader:
  """The callback of one param: our block -> stored box -> float32 block of ours."""

  def __init__(self, tensors, stored: str, to_ours, j: int, stored_shape: tuple,
               shape: tuple):
    self.tensors, self.stored, self.shape = tensors, stored, shape
    self.offsets, self.coefs = _affine_map(to_ours, stored_shape, j)
    for k, row in enumerate(self.coefs):
      if any(c < 0 for c in row):
        raise RuntimeError(f"{stored}: negative stride in dim {k} of the layout transform")
    self._last = None  # (bounds, block): devices that replicate a shard ask for it in turn

  def __call__(self, index) -> np.ndarray:
    bounds = _bounds(index, self.shape)
    if self._last is not None and self._last[0] == bounds:
      return self._last[1]
    box = []
    for off, row in zip(self.offsets, self.coefs):
      first = off + sum(c * b for c, (b, _) in zip(row, bounds))
      last = off + sum(c * (e - 1) for c, (_, e) in zip(row, bounds))
      box.append((first, last + 1))
    block = np.ascontiguousarray(self.tensors.read(self.stored,
                                                   tuple(slice(a, b) for a, b in box)))
    # Within the box, our element t (relative to the slice start) sits at sum_k coef[k].t
    # stored steps along each dim k: a strided view of the box.
    strides = [sum(row[i] * block.strides[k] for k, row in enumerate(self.coefs))
               for i in range(len(self.shape))]
    local = tuple(e - b for b, e in bounds)
    view = np.lib.stride_tricks.as_strided(block, shape=local, strides=strides,
                                           writeable=False)
    out = np.array(view, dtype=np.float32)
    self._last = (bounds, out)
    return out


def load_hf_sharded(path, shardings_for: Callable,
                    kind: Optional[str] = None) -> tuple[ModelConfig, str, dict]:
  """Reads a local HF checkpoint directory into global arrays with the given shardings.

  Equal to `hf.load_hf` (same cfg, bit-identical float32 params, same errors), but no host
  ever holds the whole model; every process of a multi-process run must call it (each
  builds its own devices' shards; no collective is involved).

  Args:
    path: directory with config.json and model.safetensors or model.safetensors.index.json.
    shardings_for: (cfg, kind) -> a NamedSharding tree shaped like that kind's params
      (e.g. `trainers.state.model_shardings` with the run's mesh and rules).
    kind: "scalar" to read a causal checkpoint as the start of a scalar model: only the
      backbone is read (the caller adds a fresh head); None reads what is stored.

  Returns:
    (cfg, stored kind, params): params float32 global arrays; for a causal checkpoint read
    with kind="scalar" they hold only "backbone".

  Raises:
    ValueError: as `hf.load_hf` (missing files, unknown architecture, missing tensor,
      shape mismatch), naming the file and tensor.
  """
  import jax  # pylint: disable=import-outside-toplevel
  cfg, stored_kind, score_bias, pad_row, tensors = hf.read_header(path)
  backbone_only = kind == "scalar" and stored_kind == "causal"
  shardings = shardings_for(cfg, stored_kind)
  abstract = api.abstract_params(cfg, stored_kind)
  embed = hf._embed_name(cfg)  # pylint: disable=protected-access
  params: dict = {}
  for name, paths, to_ours, _ in hf._entries(cfg, stored_kind):  # pylint: disable=protected-access
    if backbone_only and paths[0][0] != "backbone":
      continue
    stored = hf.stored_name(tensors, cfg, stored_kind, name)
    stored_shape = tensors.shape(stored)
    try:  # our shapes, from zero-stride stand-ins (no memory)
      probe = to_ours(np.broadcast_to(np.zeros((), np.int8), stored_shape))
    except ValueError as e:
      raise ValueError(f"{tensors.where}: tensor {stored!r} has shape {stored_shape}, which "
                       f"does not fit config.json ({e})") from None
    for j, p in enumerate(paths):
      shape = tuple(probe[j].shape)
      if pad_row and name == embed:
        shape = (cfg.vocab_size,) + shape[1:]  # the pad row save_hf appended is never read
      want = tuple(hf._get(abstract, p).shape)  # pylint: disable=protected-access
      if shape != want:
        raise ValueError(f"{tensors.where}: tensor {stored!r} gives {'.'.join(p)} shape "
                         f"{shape}, expected {want} from config.json")
      reader = _Reader(tensors, stored, to_ours, j, stored_shape, want)
      hf._set(params, p, jax.make_array_from_callback(  # pylint: disable=protected-access
          want, hf._get(shardings, p), reader))  # pylint: disable=protected-access
  if stored_kind == "scalar":
    bias = np.full((1,), score_bias, np.float32)
    params["head"]["bias"] = jax.make_array_from_callback(
        (1,), shardings["head"]["bias"], lambda idx: bias[idx])
  jax.block_until_ready(params)
  # The processes leave together: a first collective right after an uneven load would
  # otherwise risk gloo's 30 s set-up limit (`hf.process_barrier`).
  hf.process_barrier("rlhf_jax.load_hf_sharded")
  return cfg, stored_kind, params
