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

Optional Weights & Biases mirror (`train.wandb=<project>`, PPO): a `WandbSink` receives the
same finite scalars. `wandb` is not a dependency: it is imported only when asked for, and
runs offline (`WANDB_MODE=offline`, synced later with `wandb sync`) when no API key is
configured. A trainer attaches sinks around the host loop's writer:

    with metrics.attached(workdir, "ppo", [metrics.WandbSink(project, workdir, "ppo")]):
      loop.run(...)     # its MetricsWriter(workdir, "ppo") forwards every record
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import numbers
import os
import time
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from rlhf_jax.errors import UserError

log = logging.getLogger("rlhf_jax")

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
RESERVED = ("step", "stage", "time", "nonfinite")
WANDB_RUN_ID_FILE = "wandb_run_id"
# (absolute workdir, stage) -> sinks every MetricsWriter of that stage forwards records to
_ATTACHED: dict = {}


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


def read_jsonl(path: str | os.PathLike) -> list:
  """The records of a jsonl file this module wrote (a line cut short by a kill skipped)."""
  return _parse_lines(os.fspath(path))[0]


def drop_records(path: str, drop: Callable[[dict], bool], what: str = "") -> int:
  """Rewrites a jsonl file without the records `drop` selects (and half-written lines).

  Atomic (a temp file, then a rename); a no-op when nothing is dropped. Returns how many
  lines went.
  """
  if not os.path.exists(path):
    return 0
  records, bad = _parse_lines(path)
  kept = [r for r in records if not drop(r)]
  if len(kept) == len(records) and not bad:
    return 0
  if what:
    log.info("%s: dropping %d later line(s) and %d half-written one(s) from %s", what,
             len(records) - len(kept), bad, path)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps(r, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(records) - len(kept) + bad


def append_file(path: str):
  """`path` opened for appending, on a fresh line when a kill cut its last one short."""
  needs_newline = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      needs_newline = f.read(1) != b"\n"
  out = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
  if needs_newline:
    out.write("\n")
  return out


def read_metrics(workdir: str | os.PathLike, stage: Optional[str] = None) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl` (of one stage if given), in file order.

  A line cut short by a crash is skipped. Non-finite values read back as None.
  """
  records, _ = _parse_lines(os.path.join(os.fspath(workdir), METRICS_FILE))
  if stage is not None:
    records = [r for r in records if r.get("stage") == stage]
  return records


class JsonlAndBoard:
  """What the workdir's writers share: a jsonl file and a TensorBoard writer (either may be
  None, e.g. on processes other than 0), closed once, usable as a context manager."""

  _file = None
  _tb = None

  def close(self) -> None:
    """Flushes and closes the files (idempotent)."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "JsonlAndBoard":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class MetricsWriter(JsonlAndBoard):
  """Appends scalar metrics of one stage to metrics.jsonl and TensorBoard.

  Attributes:
    path: the metrics.jsonl path.
    enabled: whether this process writes (default: process 0 only).
  """

  def __init__(self, workdir: str | os.PathLike, stage: str, enabled: Optional[bool] = None,
               resume_step: Optional[int] = None, tensorboard: bool = True,
               sinks: Sequence = ()):
    """Opens the writer.

    Args:
      workdir: the run directory.
      stage: the `stage` field of every record ("sft", "rm", "ppo", ...).
      enabled: write on this process; None = `jax.process_index() == 0`.
      resume_step: if given, this stage's records with `step > resume_step` (written
        after the checkpoint being resumed from) are removed first.
      tensorboard: also write TensorBoard events under `<workdir>/tb/<stage>`.
      sinks: more receivers of each record's finite scalars (`log(step, scalars)`, e.g. a
        `WandbSink`), on top of those `attached` to this workdir and stage. The writer
        does not close them.
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
    self._sinks: list = []
    if not self.enabled:
      return
    self._sinks = list(sinks) + list(_ATTACHED.get(_key(self.workdir, stage), ()))
    os.makedirs(self.workdir, exist_ok=True)
    if resume_step is not None:
      self._truncate_after(int(resume_step))
    self._file = append_file(self.path)  # a line cut short by a kill is not extended
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIR, stage))

  def _truncate_after(self, resume_step: int) -> None:
    """Rewrites metrics.jsonl without this stage's records past `resume_step` (atomic)."""
    drop_records(self.path,
                 lambda r: r.get("stage") == self.stage and r.get("step", -1) > resume_step,
                 f"[{self.stage}] resuming at step {resume_step}")

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
    scalars = {k: v for k, v in record.items() if k not in RESERVED and
               not isinstance(v, bool) and isinstance(v, (int, float)) and v is not None}
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    for sink in self._sinks:
      sink.log(int(step), scalars)
    return record



def _key(workdir, stage: str) -> tuple:
  return os.path.abspath(os.fspath(workdir)), stage


@contextlib.contextmanager
def attached(workdir: str | os.PathLike, stage: str, sinks: Sequence):
  """While open, every `MetricsWriter(workdir, stage)` made also forwards to `sinks`.

  How a trainer adds receivers (W&B) to the writer the shared host loop owns. The sinks
  are detached on exit, not closed.
  """
  key = _key(workdir, stage)
  sinks = [s for s in sinks if s is not None]
  _ATTACHED.setdefault(key, []).extend(sinks)
  try:
    yield sinks
  finally:
    left = [s for s in _ATTACHED.get(key, []) if all(s is not t for t in sinks)]
    if left:
      _ATTACHED[key] = left
    else:
      _ATTACHED.pop(key, None)


def import_wandb(project: str):
  """The `wandb` module, or a one-line UserError saying how to install it."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel  # optional: only when asked for
  except ImportError:
    raise UserError(f"config.train.wandb={project!r} needs the Weights & Biases client: "
                    "pip install wandb (or leave train.wandb empty)") from None
  return wandb


def wandb_has_api_key() -> bool:
  """Whether W&B can log in without asking: WANDB_API_KEY, or a key `wandb login` saved."""
  if os.environ.get("WANDB_API_KEY"):
    return True
  try:
    return netrc.netrc().authenticators("api.wandb.ai") is not None
  except (OSError, netrc.NetrcParseError):
    return False


class WandbSink:
  """One W&B run per workdir and stage, resumed across restarts (its id is kept in
  `<workdir>/wandb_run_id`). Process 0 only: make it where `MetricsWriter` writes."""

  def __init__(self, project: str, workdir: str | os.PathLike, stage: str,
               config: Optional[dict] = None):
    self.wandb = import_wandb(project)
    if "WANDB_MODE" not in os.environ and not wandb_has_api_key():
      # No key: log to <workdir>/wandb offline rather than stop at a login prompt.
      os.environ["WANDB_MODE"] = "offline"
      log.info("[%s] no W&B API key configured: logging offline under %s/wandb "
               "(`wandb sync` uploads it later)", stage, os.fspath(workdir))
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    id_path = os.path.join(workdir, WANDB_RUN_ID_FILE)
    if os.path.exists(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      with open(id_path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    self.run = self.wandb.init(project=project, dir=workdir, id=run_id, resume="allow",
                               name=f"{os.path.basename(os.path.abspath(workdir))}-{stage}",
                               job_type=stage, config=config or {})

  def log(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.run.log(dict(scalars), step=int(step))

  def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence) -> None:
    self.run.log({key: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])},
                 step=int(step))

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
      self.run = None
