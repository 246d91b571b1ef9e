"""Deterministic, resumable batch iteration with per-host slices.

    it = BatchIterator(arrays, global_batch_size, seed, process_index, process_count)
    batch = next(it)         # {name: array[global_batch_size // process_count, ...]}
    state = it.state()       # {"epoch": e, "index": i}: JSON, goes into the checkpoint
    it.restore(state)        # the next batch is the one that would have come next

Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e])
.permutation(N)`` (file order with ``shuffle=False``); global batch ``i`` of the epoch is
``order[i*B:(i+1)*B]`` and process ``p`` gets the ``p``-th contiguous slice of it, so the
host slices of all processes concatenate to the global batch. Every host must see the same
arrays: the same dense arrays, or the same on-disk cache (`cache.load_cached`), whose
columns read only the rows of this host's slice (and the bucketing mask of the global
batch). ``drop_last=True`` drops the last ``N % B`` examples of
each epoch's order (different ones every epoch); ``drop_last=False`` fills the last batch up
with examples from the start of the same order, so every batch keeps its static shape.
The iterator never ends: epochs follow each other.

Length bucketing (``bucketing=Bucketing(keys, smallest, side)``): each global batch is cut
along its last (time) axis to the smallest bucket that holds its longest row, so a batch of
short rows costs short-row compute. The buckets are ``smallest, 2·smallest, 4·smallest, …``
below the stored length T, then T: one compilation per bucket, at most ``log2(T/smallest)+1``
of them. The cut only removes columns that are padding in every row of the global batch (the
length is read from the mask of the whole global batch, which every host holds, so all hosts
agree on it), and causal models never look at later positions, so the results are the ones
the uncut batch gives, up to float summation order.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from rlhf_jax.data.validate import DataError


def length_buckets(max_len: int, smallest: int) -> tuple[int, ...]:
  """``smallest · 2^i`` below `max_len`, then `max_len` (just `(max_len,)` if smallest is 0)."""
  if smallest <= 0 or smallest >= max_len:
    return (int(max_len),)
  out, b = [], int(smallest)
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (int(max_len),)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `length` (`length` must fit the largest)."""
  for b in buckets:
    if b >= length:
      return int(b)
  raise ValueError(f"bucket_for: length {length} exceeds the largest bucket {buckets[-1]}")


def used_length(mask: np.ndarray, side: str) -> int:
  """Columns a batch needs: from the first real column (left padding) or to the last (right)."""
  cols = np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0))
  if cols.size == 0:
    return 1
  return int(mask.shape[-1] - cols[0]) if side == "left" else int(cols[-1] + 1)


@dataclasses.dataclass(frozen=True)
class Bucketing:
  """Which arrays to cut along their last axis, the smallest bucket, and the padding side.

  Attributes:
    keys: names of the arrays whose last axis is time (all the same length T); the first
      one that is a mask (`mask_key`) decides the length.
    smallest: the smallest bucket; 0 turns bucketing off.
    side: "right" (keep the first L columns) or "left" (left-padded prompts: keep the last L).
    mask_key: the array whose nonzero entries are real tokens.
  """
  keys: tuple
  smallest: int
  side: str = "right"
  mask_key: str = "attention_mask"

  def __post_init__(self):
    if self.side not in ("left", "right"):
      raise ValueError(f"Bucketing.side={self.side!r}: expected 'left' or 'right'")
    if self.mask_key not in self.keys:
      raise ValueError(f"Bucketing: mask_key {self.mask_key!r} must be one of keys {self.keys}")

  def length(self, global_mask: np.ndarray) -> int:
    """The bucket for a global batch with this mask."""
    buckets = length_buckets(global_mask.shape[-1], self.smallest)
    return bucket_for(used_length(global_mask, self.side), buckets)

  def cut(self, batch: dict, length: int) -> dict:
    """`batch` with each of `keys` cut to `length` columns on the kept side."""
    sl = slice(None, length) if self.side == "right" else slice(-length, None)
    return {k: (v[..., sl] if k in self.keys else v) for k, v in batch.items()}


class BatchIterator:
  """Host slices of seed-determined global batches, epoch after epoch.

  Args:
    arrays: name -> numpy array, all with the same leading dimension N.
    global_batch_size: B, examples per step over all processes.
    seed: the order's seed (an int).
    process_index / process_count: this host and how many hosts (`jax.process_index()`,
      `jax.process_count()`); B must be divisible by process_count.
    drop_last: see module docstring.
    shuffle: False to go through the examples in their stored order every epoch.
    bucketing: cut each batch to a length bucket (module docstring); None = never cut.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, drop_last: bool = True,
               shuffle: bool = True, bucketing: Optional[Bucketing] = None):
    if not arrays:
      raise DataError("BatchIterator: no arrays to iterate over")
    # Columns of an on-disk cache (`cache.CachedColumn`, `lazy_rows`) read only the rows
    # asked for; anything else becomes one dense array.
    self.arrays = {k: v if getattr(v, "lazy_rows", False) else np.asarray(v)
                   for k, v in arrays.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise DataError(f"BatchIterator: arrays must share their leading dimension, got {sizes}")
    self.n = next(iter(sizes.values()))
    for name, value, lo in (("global_batch_size", global_batch_size, 1),
                            ("process_count", process_count, 1),
                            ("process_index", process_index, 0)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise DataError(f"BatchIterator: {name}={value!r}: expected an int >= {lo}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
      raise DataError(f"BatchIterator: seed={seed!r}: expected an int")
    if process_index >= process_count:
      raise DataError(f"BatchIterator: process_index={process_index} must be < "
                      f"process_count={process_count}")
    if global_batch_size % process_count:
      raise DataError(f"BatchIterator: global_batch_size={global_batch_size} must be "
                      f"divisible by the number of processes ({process_count})")
    if self.n == 0 or (drop_last and self.n < global_batch_size):
      raise DataError(f"BatchIterator: {self.n} examples, fewer than one global batch of "
                      f"{global_batch_size}; lower the batch size or add data")
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // int(process_count)
    self.seed = int(seed) % 2**63
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
    if self.drop_last:
      self.steps_per_epoch = self.n // self.global_batch_size
    else:
      self.steps_per_epoch = -(-self.n // self.global_batch_size)
    if bucketing is not None:
      missing = [k for k in bucketing.keys if k not in self.arrays]
      if missing:
        raise DataError(f"BatchIterator: bucketing names arrays {missing} that are not in "
                        f"{sorted(self.arrays)}")
      if len({self.arrays[k].shape[-1] for k in bucketing.keys}) != 1:
        raise DataError("BatchIterator: the bucketed arrays "
                        f"{ {k: self.arrays[k].shape for k in bucketing.keys} } must share "
                        "their last (time) dimension")
    self.bucketing = bucketing
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order = None, None

  def order(self, epoch: int) -> np.ndarray:
    """The example indices of `epoch`, `steps_per_epoch * B` of them (global)."""
    if self._order_epoch != epoch:
      if self.shuffle:
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)
      else:
        perm = np.arange(self.n)
      # np.resize repeats cyclically: fills up the last batch when drop_last=False.
      self._order = np.resize(perm, self.steps_per_epoch * self.global_batch_size)
      self._order_epoch = epoch
    return self._order

  def global_indices(self, epoch: int, index: int) -> np.ndarray:
    """Example indices of global batch `index` of `epoch`."""
    b = self.global_batch_size
    return self.order(epoch)[index * b:(index + 1) * b]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.index >= self.steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    global_idx = self.global_indices(self.epoch, self.index)
    lo = self.process_index * self.local_batch_size
    idx = global_idx[lo:lo + self.local_batch_size]
    self.index += 1
    batch = {k: v[idx] for k, v in self.arrays.items()}
    if self.bucketing is not None:
      b = self.bucketing
      batch = b.cut(batch, b.length(self.arrays[b.mask_key][global_idx]))
    return batch

  def state(self) -> dict:
    """The position as JSON: ``{"epoch": e, "index": batches already taken in e}``."""
    return {"epoch": int(self.epoch), "index": int(self.index)}

  def restore(self, state: Mapping) -> None:
    """Continues from `state()`; an empty dict means the start."""
    state = dict(state or {})
    epoch, index = state.get("epoch", 0), state.get("index", 0)
    for name, value in (("epoch", epoch), ("index", index)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"BatchIterator.restore: {name}={value!r} in the saved data "
                        "position: expected an int >= 0")
    self.epoch, self.index = int(epoch), int(index)
