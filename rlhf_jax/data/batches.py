"""Deterministic, resumable batch iteration with per-host slices.

    it = BatchIterator(arrays, global_batch_size, seed, process_index, process_count)
    batch = next(it)         # {name: array[global_batch_size // process_count, ...]}
    state = it.state()       # {"epoch": e, "index": i}: JSON, goes into the checkpoint
    it.restore(state)        # the next batch is the one that would have come next

Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e])
.permutation(N)`` (file order with ``shuffle=False``); global batch ``i`` of the epoch is
``order[i*B:(i+1)*B]`` and process ``p`` gets the ``p``-th contiguous slice of it, so the
host slices of all processes concatenate to the global batch. Every host must hold the same
arrays (each loads the full dataset). ``drop_last=True`` drops the last ``N % B`` examples of
each epoch's order (different ones every epoch); ``drop_last=False`` fills the last batch up
with examples from the start of the same order, so every batch keeps its static shape.
The iterator never ends: epochs follow each other.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from rlhf_jax.data.validate import DataError


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
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, drop_last: bool = True,
               shuffle: bool = True):
    if not arrays:
      raise DataError("BatchIterator: no arrays to iterate over")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
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
    idx = self.global_indices(self.epoch, self.index)
    lo = self.process_index * self.local_batch_size
    idx = idx[lo:lo + self.local_batch_size]
    self.index += 1
    return {k: v[idx] for k, v in self.arrays.items()}

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
