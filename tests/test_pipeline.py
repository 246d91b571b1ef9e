"""The embedded default pipeline, shortened (`configs/ppo.py:tiny`), through the launcher.

Checks the workdir contract a user and tools rely on: each stage's metrics and export,
`eval.json` with the paper-style keys, `report.md` and the plots; and that a rerun reuses
finished stages instead of training them again.
"""

from __future__ import annotations

import json
import math
import os

import helpers


def test_tiny_pipeline_end_to_end(tmp_path):
  workdir = str(tmp_path / "demo")
  proc = helpers.run_launcher("configs/ppo.py:tiny", workdir, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  for stage in ("pretrain", "sft", "rm", "ppo", "ppo_noptx"):
    assert os.path.isfile(os.path.join(workdir, stage, "metrics.jsonl")), stage
  assert os.path.isfile(os.path.join(workdir, "rm", "export", "reward_model", "config.json"))
  assert os.path.isfile(os.path.join(workdir, "ppo", "export", "policy", "model.safetensors"))
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  for key in ("oracle_win_rate", "rm_accuracy", "kl_to_sft"):
    assert math.isfinite(result[key]), key
  assert 0.0 <= result["oracle_win_rate"] <= 1.0 and 0.0 <= result["rm_accuracy"] <= 1.0
  for key in ("pretrain_loss", "unsafe_rate"):
    assert set(result[key]) == {"sft", "ppo", "ppo_noptx"}, key
    assert all(math.isfinite(v) for v in result[key].values())
  report = open(os.path.join(workdir, "report.md")).read()
  assert "oracle win rate" in report and "| prompt | SFT |" in report
  for png in ("ppo_curves.png", "reward_vs_kl.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000
  # The same command again reuses every finished stage and re-evaluates.
  proc = helpers.run_launcher("configs/ppo.py:tiny", workdir, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert proc.stderr.count("reusing") == 5, proc.stderr[-3000:]
