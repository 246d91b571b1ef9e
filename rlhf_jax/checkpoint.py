"""Checkpoints of the train-state pytree plus a small JSON of host-side state (orbax).

One checkpoint per step in `<directory>/<step>/`, holding two orbax items: `state` (the
train-state pytree; sharded arrays are written and read per shard, on every host) and
`extra` (JSON: data position, KL controller, ...; written by the primary process only).

Atomicity (orbax `AtomicRenameTemporaryPath`, the default on local and network
filesystems): a save writes `<step>.orbax-checkpoint-tmp-<n>/`, writes
`commit_success.txt` into it, then renames it to `<step>/`. Step discovery only matches
`^<step>$` directories that are finalized, so a save killed at any point is never restored;
its leftover tmp dir is deleted when the next `Checkpointer` opens the directory.

A finalized step can still be damaged later (truncated or deleted files, a full disk).
`restore_latest` then warns, naming the step and the error, moves the damaged directory
aside to `<step>.corrupt-<unix time>/` (kept for inspection, invisible to orbax) and
restores the previous step.

Typed PRNG keys (`jax.random.key`) and raw uint32 keys both round-trip (orbax 0.12 stores
typed keys natively).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger("rlhf_jax")

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
CORRUPT_SUFFIX = ".corrupt-"


def _all_processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process (so that all hosts fall back to the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _as_abstract(target: Any) -> Any:
  """Arrays or ShapeDtypeStructs -> ShapeDtypeStructs that keep the target's shardings."""
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x  # numpy arrays / python scalars: orbax restores them as numpy
  return jax.tree.map(leaf, target)


class Checkpointer:
  """Saves and restores `(state pytree, extra JSON)` per step, keeping the latest few.

  Multi-host: every process constructs it with the same directory (on a filesystem all
  hosts share) and calls `save` / `restore_latest` at the same steps; orbax writes each
  host's shards and the primary writes the metadata and `extra`.

  Attributes:
    directory: absolute path of the checkpoint root.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, async_save: bool = False):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: root directory; step `s` lives in `<directory>/<s>/`.
      max_to_keep: keep only the newest this many steps (None keeps all).
      save_interval_steps: `save` skips steps that are not a multiple of this unless
        `force=True`.
      async_save: return from `save` while the write continues in the background
        (call `wait_until_finished` or `close` before exiting). Off by default: a returned
        `save` is a finished, committed checkpoint.
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep}: expected a positive int or None")
    self.directory = os.path.abspath(os.fspath(directory))
    self.async_save = async_save
    preservation = checkpoint_managers.LatestN(max_to_keep) if max_to_keep else None
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a save killed mid-write
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE_ITEM, EXTRA_ITEM))

  def all_steps(self) -> list[int]:
    """Finalized steps present on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest finalized step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, extra: Optional[dict] = None, *,
           extra_json: Optional[dict] = None, force: bool = False) -> bool:
    """Writes `state` and `extra` as step `step` (atomically).

    A step that already exists (e.g. a damaged checkpoint that a resumed run reaches
    again) is replaced.

    Args:
      step: the step number (the directory name).
      state: the train-state pytree of `jax.Array`s (sharded or not), numpy arrays and
        python scalars.
      extra: JSON-serialisable dict of host-side state (`extra_json` is an alias).
      force: save even if `step` is not a multiple of `save_interval_steps`.

    Returns:
      Whether a checkpoint was written.
    """
    if extra is not None and extra_json is not None:
      raise TypeError("pass either extra or extra_json, not both")
    extra = dict(extra if extra is not None else extra_json or {})
    try:  # fail before any byte is written, naming the problem
      json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint extra must be JSON (no NaN, no arrays): {e}") from None
    step = int(step)
    if step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                   EXTRA_ITEM: ocp.args.JsonSave(extra)}),
        force=force)
    if not self.async_save:
      self._manager.wait_until_finished()
    return bool(saved)

  def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
    """Restores one step (no fallback).

    Args:
      step: a step in `all_steps()`.
      target: the state's structure with leaves that are `jax.ShapeDtypeStruct`s with
        shardings, or arrays whose shardings to reuse; None restores as saved.

    Returns:
      (state, extra).
    """
    state_args = (ocp.args.StandardRestore(_as_abstract(target)) if target is not None
                  else ocp.args.StandardRestore())
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(**{STATE_ITEM: state_args,
                                              EXTRA_ITEM: ocp.args.JsonRestore()}))
    extra = restored[EXTRA_ITEM]
    return restored[STATE_ITEM], dict(extra) if extra is not None else {}

  def restore_latest(self, target: Any = None) -> Optional[tuple[Any, dict]]:
    """Restores the newest step that reads back cleanly.

    A step that fails to restore is reported with a warning naming it and the error;
    once an older step restores, the failed newer ones are moved aside (see the module
    docstring) so that the run continues from the good one.

    Args:
      target: as in `restore` (abstract state with shardings, or concrete arrays).

    Returns:
      (state, extra), or None when the directory holds no checkpoint.

    Raises:
      RuntimeError: checkpoints exist but none of them can be restored (this usually
        means the target's structure does not match what was saved).
    """
    self._manager.wait_until_finished()
    steps = sorted(self._manager.all_steps(), reverse=True)
    failed: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        result, error = self.restore(step, target), None
      except Exception as e:  # pylint: disable=broad-except  # any read error = damaged
        result, error = None, e
      if not _all_processes_agree(error is None):
        e = error or RuntimeError("restore failed on another process")
        log.warning("checkpoint step %d in %s could not be restored (%s: %s); trying the "
                    "previous one", step, self.directory, type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "")
        failed.append((step, e))
        continue
      if failed:
        self._quarantine([s for s, _ in failed])
        log.warning("restored checkpoint step %d from %s instead of the damaged step(s) %s",
                    step, self.directory, [s for s, _ in failed])
      return result
    if failed:
      step, error = failed[0]
      raise RuntimeError(
          f"none of the checkpoints {steps} in {self.directory} could be restored; the "
          f"newest (step {step}) failed with {type(error).__name__}: {error}. If the "
          "model or optimiser changed since they were written, use a new workdir."
      ) from error
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Renames damaged step dirs to `<step>.corrupt-<time>` (primary process), then syncs."""
    stamp = int(time.time())
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst = f"{src}{CORRUPT_SUFFIX}{stamp}"
        if os.path.isdir(src):
          os.rename(src, dst)
          log.warning("moved damaged checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(
          "rlhf_jax_quarantine_" + "_".join(str(s) for s in steps))
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until an async save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
