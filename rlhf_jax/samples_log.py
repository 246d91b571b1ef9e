"""What the policy writes: a few sampled rows every `train.sample_every` PPO iterations.

Each row is one JSON object per line of `<workdir>/samples.jsonl`,

    {"step": 10, "stage": "ppo", "row": 0, "prompt": "...", "response": "...",
     "score": 0.7, "fn_score": 2.0, "kl": 0.12}

(`fn_score` only when `ppo.reward_fn` is used; `score` is the total reward the experience
used; `kl` is the sequence's summed log π/π_SFT), the same rows as a TensorBoard text table
under `<workdir>/tb/<stage>/` (tag `samples`), and as a W&B table when a `WandbSink` is
given. Resume works as in `metrics`: rows with `step > resume_step` are dropped first, so
a killed and resumed run ends with the rows of an uninterrupted one. Process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from rlhf_jax import metrics

SAMPLES_FILE = "samples.jsonl"
TEXT_TAG = "samples"


def read_samples(workdir: str | os.PathLike) -> list:
  """The rows of `<workdir>/samples.jsonl` in file order (a half-written line skipped)."""
  return metrics.read_jsonl(os.path.join(os.fspath(workdir), SAMPLES_FILE))


class SamplesWriter(metrics.JsonlAndBoard):
  """Appends sampled rows to samples.jsonl, TensorBoard text and (optionally) W&B."""

  def __init__(self, workdir: str | os.PathLike, stage: str, enabled: Optional[bool] = None,
               resume_step: Optional[int] = None, tensorboard: bool = True, wandb=None):
    """Opens the writer.

    Args:
      workdir: the run directory.
      stage: the `stage` field of every row.
      enabled: write on this process; None = `jax.process_index() == 0`.
      resume_step: rows with `step > resume_step` are removed first.
      tensorboard: also write a text table under `<workdir>/tb/<stage>`.
      wandb: a `metrics.WandbSink` to log the rows to as a table, or None.
    """
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.workdir, self.stage, self.enabled = os.fspath(workdir), stage, bool(enabled)
    self.path = os.path.join(self.workdir, SAMPLES_FILE)
    self._file = self._tb = None
    self._wandb = wandb if self.enabled else None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if resume_step is not None:
      metrics.drop_records(self.path, lambda r: r.get("step", -1) > int(resume_step),
                           f"[{stage}] resuming at step {resume_step} (samples)")
    self._file = metrics.append_file(self.path)
    if tensorboard:
      from tensorboardX import SummaryWriter
      # Its own event file beside the metrics writer's (same directory, same stage run).
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, metrics.TB_DIR, stage),
                               filename_suffix=".samples")

  def write(self, step: int, rows: Sequence[dict]) -> list:
    """Appends `rows` (dicts of prompt, response, score, [fn_score,] kl) at `step`.

    Returns the records written (none on a disabled process).
    """
    if not self.enabled or not rows:
      return []
    records = []
    for i, row in enumerate(rows):
      record = {"step": int(step), "stage": self.stage, "row": i}
      for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
          value = None
        record[key] = value
      records.append(record)
      self._file.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
    self._file.flush()
    columns = [k for k in records[0] if k not in ("step", "stage")]
    if self._tb is not None:
      self._tb.add_text(TEXT_TAG, markdown_table(columns, records), int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log_table(step, TEXT_TAG, columns, [[r.get(c) for c in columns]
                                                      for r in records])
    return records



def markdown_table(columns: Sequence[str], records: Sequence[dict]) -> str:
  """A Markdown table (TensorBoard's text plugin renders it) of `records`' `columns`."""
  def cell(value) -> str:
    if isinstance(value, float):
      value = f"{value:.4g}"
    text = "" if value is None else str(value)
    return " ".join(text.replace("|", "\\|").split()) or " "
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records]
  return "\n".join(lines)
