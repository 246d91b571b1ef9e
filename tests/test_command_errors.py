"""launch/sample.py and launch/evaluate.py: a mistake in the input is one `error:` line.

Exit status 2 and no traceback, naming the flag, as launch/train.py reports a config error.
"""

from __future__ import annotations

import pytest

import command_helpers
import helpers

torch = pytest.importorskip("torch", reason="the tiny HF models are built with transformers")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  model = helpers.tiny_hf_llama(str(root / "policy"))
  prompts = helpers.write_jsonl(str(root / "prompts.jsonl"), command_helpers.prompt_rows(3))
  (root / "rewards.py").write_text("def length(prompts, responses):\n"
                                   "  return [float(len(r)) for r in responses]\n")
  return dict(root=root, model=model, prompts=prompts, reward_fn=f"{root}/rewards.py:length")


def test_sample_missing_model_dir(inputs):
  missing = str(inputs["root"] / "no_such_run")
  line = command_helpers.error_line(command_helpers.run_command(
      "sample.py", f"--model={missing}", f"--prompts={inputs['prompts']}",
      f"--out={inputs['root'] / 'out.jsonl'}"))
  assert line.startswith(f"error: --model={missing}: not a model") and "export/policy" in line


def test_sample_missing_prompts_file(inputs):
  missing = str(inputs["root"] / "no_such_prompts.jsonl")
  line = command_helpers.error_line(command_helpers.run_command(
      "sample.py", f"--model={inputs['model']}", f"--prompts={missing}",
      f"--out={inputs['root'] / 'out.jsonl'}"))
  assert line.startswith("error: --prompts:") and f"{missing}: no such file" in line


def test_sample_prompt_too_long(inputs):
  line = command_helpers.error_line(command_helpers.run_command(
      "sample.py", f"--model={inputs['model']}", f"--prompts={inputs['prompts']}",
      f"--out={inputs['root'] / 'out.jsonl'}", "--max_prompt_len=3"))
  assert "[prompt_too_long]" in line and "--max_prompt_len" in line and "row 0" in line


def test_evaluate_missing_model_dir(inputs):
  missing = str(inputs["root"] / "no_such_baseline")
  line = command_helpers.error_line(command_helpers.run_command(
      "evaluate.py", f"--policy={inputs['model']}", f"--baseline={missing}",
      f"--prompts={inputs['prompts']}", f"--reward_fn={inputs['reward_fn']}",
      f"--out_dir={inputs['root'] / 'eval'}"))
  assert line.startswith(f"error: --baseline={missing}: not a model")


def test_evaluate_missing_prompts_file(inputs):
  missing = str(inputs["root"] / "no_such_prompts.jsonl")
  line = command_helpers.error_line(command_helpers.run_command(
      "evaluate.py", f"--policy={inputs['model']}", f"--baseline={inputs['model']}",
      f"--prompts={missing}", f"--reward_fn={inputs['reward_fn']}",
      f"--out_dir={inputs['root'] / 'eval'}"))
  assert line.startswith("error: --prompts:") and f"{missing}: no such file" in line


def test_evaluate_needs_a_judge(inputs):
  line = command_helpers.error_line(command_helpers.run_command(
      "evaluate.py", f"--policy={inputs['model']}", f"--baseline={inputs['model']}",
      f"--prompts={inputs['prompts']}"))
  assert "--reward_model" in line and "--reward_fn" in line
