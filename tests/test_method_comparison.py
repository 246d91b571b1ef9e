"""bench/method_comparison.py: the README's comparison command, on the :tiny task, and its
choice of coefficients from a sweep.

The full command (3 seeds, a sweep, the default task) takes about an hour on 2 cores; here
the same script runs end to end on `:tiny` configs (the demo, then methods from its shared
stages, the README block, the plot), and separately picks coefficients from eval.json files
written by hand, whose best win rates are known.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import helpers

SCRIPT = os.path.join(helpers.REPO, "bench", "method_comparison.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
import method_comparison  # noqa: E402


def _readme(path):
  with open(path, "w") as f:
    f.write(f"# title\n\nbefore\n\n{method_comparison.MARK}\nold table\n"
            f"{method_comparison.MARK}\n\nafter\n")
  return path


def test_readme_command_on_the_tiny_task(tmp_path):
  readme = _readme(str(tmp_path / "README.md"))
  root = str(tmp_path / "compare")
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--variant=:tiny", "--seeds", "0", "--tune_seed=-1",
       "--methods", "PPO-ptx", "PPO", "RLOO", "DPO", f"--root={root}", f"--readme={readme}",
       f"--append={tmp_path / 'bench.md'}", f"--plot={tmp_path / 'plot.png'}"],
      capture_output=True, text=True, timeout=900, env=helpers.launcher_env(),
      cwd=helpers.REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(root, "results.json")) as f:
    rows = json.load(f)["rows"]
  assert [r["method"] for r in rows] == ["PPO-ptx", "PPO", "RLOO", "DPO"]
  # RLOO and DPO trained in their own workdirs on the demo's SFT model and RM (links).
  for name in ("rloo_kl_coef0.04", "dpo_beta0.1"):
    sft = os.path.join(root, "seed0", name, "sft")
    assert os.path.islink(sft) and os.path.realpath(sft) == os.path.join(root, "seed0",
                                                                        "demo", "sft")
  with open(os.path.join(root, "seed0", "demo", "eval.json")) as f:
    demo = json.load(f)
  assert rows[0]["win"] == demo["oracle_win_rate"]
  assert rows[1]["win"] == demo["oracle_win_rate_no_ptx"]
  for r in rows:
    assert 0.0 <= r["win"] <= r["ceiling"] <= 1.0 and r["wall"] >= 0
  text = open(readme).read()
  assert "old table" not in text and text.startswith("# title\n\nbefore")
  assert text.rstrip().endswith("after") and "| RLOO | ppo.kl_coef = 0.04 |" in text
  assert "![win rate against KL](plot.png)" in text and os.path.isfile(tmp_path / "plot.png")


def _fake_run(workdir, method_key, win, kl, stage_seconds):
  """An eval.json and a launcher log as a finished method run leaves them."""
  os.makedirs(workdir, exist_ok=True)
  result = dict(method=method_key, oracle_win_rate=win, oracle_win_rate_ceiling=0.9,
                kl_to_sft=kl, alignment_tax={method_key: 0.01},
                unsafe_rate={"sft": 0.2, method_key: 0.0}, rm_accuracy=0.9)
  if method_key == "ppo":
    result.update(oracle_win_rate_no_ptx=win - 0.05, kl_to_sft_no_ptx=kl + 0.5,
                  alignment_tax={"ppo": 0.01, "ppo_noptx": 0.3},
                  unsafe_rate={"sft": 0.2, "ppo": 0.0, "ppo_noptx": 0.0})
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f)
  stages = [method_key] + (["ppo_noptx"] if method_key == "ppo" else [])
  with open(workdir + ".log", "w") as f:
    t = 10 * 3600
    for stage in stages:
      f.write(f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d} [pipeline] {stage}: training\n")
      t += stage_seconds
    f.write(f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d} [eval] oracle win rates\n"
            f"command wall time: 300.0 s\n")


def test_sweep_picks_the_best_win_rate_and_reports_it_on_every_seed(tmp_path):
  root = str(tmp_path)
  wins = {0.01: 0.70, 0.04: 0.80, 0.16: 0.75}      # GRPO's sweep on the tuning seed
  for seed in (7, 0, 1):
    _fake_run(os.path.join(root, f"seed{seed}", "demo"), "ppo", 0.7, 1.0, 50)
  for coef, win in wins.items():
    _fake_run(os.path.join(root, "seed7", f"grpo_kl_coef{coef:g}"), "grpo", win, coef * 10, 40)
  for seed, win in ((0, 0.82), (1, 0.78)):
    _fake_run(os.path.join(root, f"seed{seed}", "grpo_kl_coef0.04"), "grpo", win, 0.5, 65)
  readme = _readme(str(tmp_path / "README.md"))
  method_comparison.main(["--seeds", "0", "1", "--tune_seed=7", "--methods", "GRPO",
                          f"--root={root}", f"--readme={readme}",
                          f"--plot={tmp_path / 'plot.png'}"])
  with open(os.path.join(root, "results.json")) as f:
    out = json.load(f)
  assert out["chosen"] == {"GRPO": 0.04}
  assert [(r["seed"], r["win"], r["wall"]) for r in out["rows"]] == [(0, 0.82, 65.0),
                                                                    (1, 0.78, 65.0)]
  text = open(readme).read()
  assert "| GRPO | ppo.kl_coef = 0.04 | 0.800 ± 0.028 |" in text   # mean ± sd of 0.82, 0.78
  assert "| 0 | 5.0 |" in text   # the demo's command wall time, in minutes


def test_stage_seconds_needs_the_stage_line(tmp_path):
  log = tmp_path / "x.log"
  log.write_text("23:59:58 [pipeline] grpo: training in w\n00:00:03 [eval] oracle\n")
  assert method_comparison.stage_seconds(str(log), "grpo") == 5.0   # across midnight
  with pytest.raises(SystemExit, match="dpo"):
    method_comparison.stage_seconds(str(log), "dpo")
