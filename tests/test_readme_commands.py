"""Every command the README shows for your own model and data, run as written.

The commands are read from README.md's "Run each stage on your own model and data" section
(each ```bash block, lines joined at the trailing backslashes) and run in order in a temp
directory holding `data/` (files made here, with the SFT prompt column renamed to
`question` as the README says) and `runs/`; only `/models/Qwen2-0.5B` becomes a tiny random
HF Llama and `launch/` / `configs/` point into this checkout. Then the outputs a user reads
are checked: the exports load in transformers, the sample rows feed the RM, eval.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys

import pytest

import helpers

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoint")

SECTION = "## Run each stage on your own model and data"
WORDS = ["a", "b", "c", "d", "e"]


def readme_commands() -> list:
  text = open(os.path.join(helpers.REPO, "README.md")).read()
  section = text[text.index(SECTION):]
  section = section[:section.index("\n## ", len(SECTION))]
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", section, re.S):
    for command in block.replace("\\\n", " ").splitlines():
      if command.strip():
        commands.append(command.strip())
  return commands


def _write_data(data_dir: str) -> None:
  rng = random.Random(0)
  os.makedirs(data_dir)
  def prompt():
    return "say : " + " ".join(rng.choice(WORDS) for _ in range(2)) + " ="
  w = lambda name, rows: helpers.write_jsonl(os.path.join(data_dir, name), rows)  # noqa
  sft = []
  for _ in range(96):
    p = prompt()
    sft.append(dict(question=p, completion=p.split(":")[1].strip(" =")))
  w("sft.jsonl", sft[:64])
  w("sft_eval.jsonl", sft[64:])
  pairs = []
  for _ in range(96):
    p = prompt()
    pairs.append(dict(prompt=p, chosen=p.split(":")[1].strip(" =") + " good",
                      rejected="bad " + rng.choice(WORDS)))
  w("comparisons.jsonl", pairs[:64])
  w("comparisons_eval.jsonl", pairs[64:])
  w("prompts.jsonl", [dict(prompt=prompt()) for _ in range(64)])
  w("prompts_eval.jsonl", [dict(prompt=prompt()) for _ in range(32)])
  # Enough text for PPO-ptx's packed 512-token rows (4 minibatches x 8 rows a step).
  w("pretrain.jsonl", [dict(text=" ".join(rng.choice(WORDS + ["good", "bad"])
                                          for _ in range(60))) for _ in range(400)])
  with open(os.path.join(data_dir, "my_rewards.py"), "w") as f:
    f.write("def score(prompts, responses):\n"
            "  return [float(r.split().count('good')) for r in responses]\n")


def test_readme_commands_run_as_written(tmp_path):
  commands = readme_commands()
  assert [c.split()[1] for c in commands] == [
      "launch/train.py"] * 4 + ["launch/sample.py", "launch/evaluate.py"], commands
  root = str(tmp_path)
  base = helpers.tiny_hf_llama(os.path.join(root, "base"))
  _write_data(os.path.join(root, "data"))
  env = helpers.launcher_env()
  for command in commands:
    argv = shlex.split(command.replace("/models/Qwen2-0.5B", base))
    assert argv[0] == "python"
    argv = [sys.executable, os.path.join(helpers.REPO, argv[1])] + [
        a.replace("--config=configs/", f"--config={helpers.REPO}/configs/") for a in argv[2:]]
    proc = subprocess.run(argv + (["--config.train.progress=False"]
                                  if "train.py" in argv[1] else []),
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (command, proc.stderr[-4000:])

  import transformers
  runs = os.path.join(root, "runs")
  for stage in ("sft", "ppo", "ppo_fn"):
    transformers.AutoModelForCausalLM.from_pretrained(os.path.join(runs, stage, "export",
                                                                   "policy"))
  transformers.AutoModelForSequenceClassification.from_pretrained(
      os.path.join(runs, "rm", "export", "reward_model"))
  rows = [json.loads(l) for l in open(os.path.join(root, "data", "samples.jsonl"))]
  assert len(rows) == 64 and all(len(r["responses"]) == 4 for r in rows)
  transformers.AutoModelForSequenceClassification.from_pretrained(
      os.path.join(runs, "ppo", "export", "value_model"))
  assert os.path.getsize(os.path.join(runs, "ppo", "samples.jsonl")) > 0
  result = json.load(open(os.path.join(runs, "eval", "eval.json")))
  assert result["n_prompts"] == 32 and result["judges"] == ["reward_model"]
  lo, hi = result["win_rate_ci95"]["reward_model"]
  wins, ties, losses = result["wins_ties_losses"]["reward_model"]
  assert result["win_rate"]["reward_model"] == (wins + ties / 2) / 32
  assert lo <= result["win_rate"]["reward_model"] <= hi
  assert os.path.isfile(os.path.join(runs, "eval", "report.md"))
