"""Tests for rlhf_jax.metrics: the metrics.jsonl format, NaN handling, TensorBoard, resume."""

from __future__ import annotations

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import metrics


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_jsonl_records_and_types(tmp_path):
  with metrics.MetricsWriter(tmp_path, "sft", enabled=True) as w:
    w.write(1, {"loss": jnp.float32(1.5), "lr": np.float64(1e-3), "tokens": np.int64(7),
                "acc": jnp.asarray(0.25), "python": 2, "hist": np.array([1.0, 2.0]),
                "note": "ok"})
    w.write(2, {"loss": 1.25})
  lines = _lines(tmp_path)
  assert [r["step"] for r in lines] == [1, 2]
  first = lines[0]
  assert first["stage"] == "sft" and isinstance(first["time"], float)
  assert first["loss"] == 1.5 and isinstance(first["loss"], float)
  assert first["lr"] == 1e-3 and first["tokens"] == 7 and isinstance(first["tokens"], int)
  assert first["acc"] == 0.25 and first["python"] == 2 and first["hist"] == [1.0, 2.0]
  assert first["note"] == "ok" and "nonfinite" not in first
  assert metrics.read_metrics(tmp_path, "sft") == lines
  assert metrics.read_metrics(tmp_path, "rm") == []


def test_nonfinite_values_are_null_and_listed(tmp_path):
  with metrics.MetricsWriter(tmp_path, "ppo", enabled=True) as w:
    w.write(3, {"loss": float("nan"), "kl": jnp.float32(jnp.inf), "score": 0.5,
                "vec": np.array([1.0, -np.inf])})
  with open(tmp_path / "metrics.jsonl") as f:
    text = f.read()
  assert "NaN" not in text and "Infinity" not in text    # strict JSON
  (record,) = _lines(tmp_path)
  assert record["loss"] is None and record["kl"] is None and record["vec"] == [1.0, None]
  assert record["score"] == 0.5
  assert sorted(record["nonfinite"]) == ["kl", "loss", "vec"]


def test_tensorboard_events(tmp_path):
  with metrics.MetricsWriter(tmp_path, "rm", enabled=True) as w:
    w.write(1, {"loss": 0.7, "bad": float("nan")})
    w.write(2, {"loss": 0.6})
  files = glob.glob(str(tmp_path / "tb" / "rm" / "events.out.tfevents.*"))
  assert len(files) == 1 and os.path.getsize(files[0]) > 0
  from tensorboardX.event_file_writer import event_pb2  # parse what was written
  tags = []
  with open(files[0], "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    tags += [(event.step, v.tag, round(v.simple_value, 4)) for v in event.summary.value]
  assert tags == [(1, "loss", 0.7), (2, "loss", 0.6)]


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricsWriter(tmp_path / "run", "sft", enabled=False)
  assert w.write(1, {"loss": 1.0}) is None
  w.close()
  assert not os.path.exists(tmp_path / "run")
  # Default: enabled only on process 0 (this test runs as the single process 0).
  w = metrics.MetricsWriter(tmp_path / "run", "sft")
  assert w.enabled
  w.close()


def test_resume_truncates_later_steps_of_the_stage(tmp_path):
  def run(steps, resume_step=None):
    with metrics.MetricsWriter(tmp_path, "ppo", enabled=True, resume_step=resume_step) as w:
      for s in steps:
        w.write(s, {"loss": 1.0 / s})
  with metrics.MetricsWriter(tmp_path, "sft", enabled=True) as w:   # another stage
    w.write(10, {"loss": 9.0})
  run(range(1, 7))                      # killed after logging step 6, checkpoint at 4
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "stage": "ppo", "lo')   # the line being written at the kill
  run(range(5, 9), resume_step=4)
  ppo = metrics.read_metrics(tmp_path, "ppo")
  assert [r["step"] for r in ppo] == list(range(1, 9))
  assert [r["loss"] for r in ppo] == [1.0 / s for s in range(1, 9)]
  assert [r["step"] for r in metrics.read_metrics(tmp_path, "sft")] == [10]
  assert len(_lines(tmp_path)) == 9     # every line is valid JSON again


def test_append_after_a_cut_line_without_resume(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "stage": "sft", "loss": 1.0}\n{"step": 2, "sta')
  with metrics.MetricsWriter(tmp_path, "sft", enabled=True) as w:
    w.write(3, {"loss": 0.5})
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 3]


def test_reserved_names_rejected(tmp_path):
  with metrics.MetricsWriter(tmp_path, "sft", enabled=True) as w:
    with pytest.raises(ValueError, match="reserved"):
      w.write(1, {"step": 3})
