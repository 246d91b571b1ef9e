"""The embedded default pipeline, shortened (`configs/ppo.py:tiny`), through the launcher.

Checks the workdir contract a user and tools rely on: each stage's metrics and export,
`eval.json` with the paper-style keys, `report.md` and the plots; and that a rerun reuses
finished stages instead of training them again.
"""

from __future__ import annotations

import json
import math
import os

import pytest

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


@pytest.mark.parametrize("field,value,holds", [("rm_prompts", 600, 512),
                                               ("rm_eval_prompts", 40, 32)])
def test_labeling_more_prompts_than_the_task_data_holds_is_an_error(tmp_path, field, value,
                                                                    holds):
  """Asking for more labeled prompts than the task's prompt file holds names the field (it
  used to label the file's prompts only, silently); nothing is written."""
  from rlhf_jax.pipeline import settings as settings_lib
  from rlhf_jax.pipeline import stages
  s = settings_lib.task_settings("tiny")
  task_dir = str(tmp_path / "task_data")
  stages.prepare_task_data(s, 0, task_dir)
  s[field] = value
  with pytest.raises(ValueError, match=rf"pipeline\.{field}={value}: .* holds only {holds} "):
    stages.collect_rankings(s, 0, str(tmp_path), task_dir)
  assert not any(n.startswith("comparisons") for n in os.listdir(task_dir))
