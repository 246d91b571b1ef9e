"""Training metrics: `<workdir>/metrics.jsonl` plus TensorBoard event files.

Each `MetricsWriter.write(step, scalars)` appends one JSON object per line,

    {"step": 100, "stage": "sft", "time": 1718000000.1, "loss": 1.23, ...}

and flushes it, so a SIGKILL loses at most the line being written. JSON has no NaN: a
non-finite value is written as `null` and its key listed under `"nonfinite"`. The same
scalars go to TensorBoard under `<workdir>/tb/<stage>/` (non-finite ones are skipped).

Resume: `MetricsWriter(workdir, stage, resume_step=s)` first drops this stage's lines with
`step > s` (and any half-written line), so a killed and resumed run ends with the same
metrics.jsonl values as an uninterrupted one (the `time` field aside). Only process 0
writes (by default).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from typing import Any, Mapping, Optional

import numpy as np

log = logging.getLogger("rlhf_jax")

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
RESERVED = ("step", "stage", "time", "nonfinite")


def _to_json_value(value: Any) -> Any:
  """Scalars (python, numpy, jax) -> python numbers; arrays -> (nested) lists; NaN -> nan."""
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  arr = np.asarray(value)  # jax arrays and numpy scalars land here (one device transfer)
  if arr.dtype.kind == "b":
    return arr.tolist()
  if arr.dtype.kind in "iu":
    return arr.tolist()
  if arr.dtype.kind == "f":
    return arr.astype(np.float64).tolist()
  if arr.dtype.kind in "US":
    return arr.tolist()
  raise TypeError(f"metric value of type {type(value).__name__} / dtype {arr.dtype} is "
                  "not a number, string or array of numbers")


def _has_nonfinite(value: Any) -> bool:
  if isinstance(value, float):
    return not math.isfinite(value)
  if isinstance(value, list):
    return any(_has_nonfinite(v) for v in value)
  return False


def _nan_to_none(value: Any) -> Any:
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, list):
    return [_nan_to_none(v) for v in value]
  return value


def _parse_lines(path: str) -> tuple[list[dict], int]:
  """(records, number of unparseable lines) of a metrics.jsonl file."""
  records, bad = [], 0
  if not os.path.exists(path):
    return records, bad
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill
        bad += 1
  return records, bad


def read_metrics(workdir: str | os.PathLike, stage: Optional[str] = None) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl` (of one stage if given), in file order.

  A line cut short by a crash is skipped. Non-finite values read back as None.
  """
  records, _ = _parse_lines(os.path.join(os.fspath(workdir), METRICS_FILE))
  if stage is not None:
    records = [r for r in records if r.get("stage") == stage]
  return records


class MetricsWriter:
  """Appends scalar metrics of one stage to metrics.jsonl and TensorBoard.

  Attributes:
    path: the metrics.jsonl path.
    enabled: whether this process writes (default: process 0 only).
  """

  def __init__(self, workdir: str | os.PathLike, stage: str, enabled: Optional[bool] = None,
               resume_step: Optional[int] = None, tensorboard: bool = True):
    """Opens the writer.

    Args:
      workdir: the run directory.
      stage: the `stage` field of every record ("sft", "rm", "ppo", ...).
      enabled: write on this process; None = `jax.process_index() == 0`.
      resume_step: if given, this stage's records with `step > resume_step` (written
        after the checkpoint being resumed from) are removed first.
      tensorboard: also write TensorBoard events under `<workdir>/tb/<stage>`.
    """
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.workdir = os.fspath(workdir)
    self.stage = stage
    self.enabled = bool(enabled)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if resume_step is not None:
      self._truncate_after(int(resume_step))
    needs_newline = False
    if os.path.exists(self.path) and os.path.getsize(self.path):
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"  # a line cut short by a kill: don't extend it
    self._file = open(self.path, "a", encoding="utf-8")
    if needs_newline:
      self._file.write("\n")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIR, stage))

  def _truncate_after(self, resume_step: int) -> None:
    """Rewrites metrics.jsonl without this stage's records past `resume_step` (atomic)."""
    if not os.path.exists(self.path):
      return
    records, bad = _parse_lines(self.path)
    kept = [r for r in records
            if not (r.get("stage") == self.stage and r.get("step", -1) > resume_step)]
    if len(kept) == len(records) and not bad:
      return
    log.info("[%s] resuming at step %d: dropping %d later metrics line(s) and %d "
             "half-written one(s) from %s", self.stage, resume_step,
             len(records) - len(kept), bad, self.path)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in kept:
        f.write(json.dumps(r, allow_nan=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, Any]) -> Optional[dict]:
    """Appends one record; returns it (None on a disabled process).

    Args:
      step: the step the values belong to.
      scalars: name -> number (python / numpy / jax scalar), string, or small array.
    """
    if not self.enabled:
      return None
    record: dict = {"step": int(step), "stage": self.stage, "time": time.time()}
    nonfinite = []
    for key, value in scalars.items():
      if key in RESERVED:
        raise ValueError(f"metric name {key!r} is reserved ({RESERVED})")
      value = _to_json_value(value)
      if _has_nonfinite(value):
        nonfinite.append(key)
        value = _nan_to_none(value)
      record[key] = value
    if nonfinite:
      record["nonfinite"] = nonfinite
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key in RESERVED or isinstance(value, bool):
          continue
        if isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    """Flushes and closes the files (idempotent)."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
