"""Fixtures of the command tests (launch/sample.py, launch/evaluate.py): runs and models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers


def run_command(script: str, *args: str, timeout: int = 180):
  """Runs `launch/<script>` as a user would (CPU, one device); returns CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(helpers.REPO, "launch", script), *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=helpers.launcher_env(), cwd=helpers.REPO)


def error_line(proc) -> str:
  """The one `error: ...` line of a run that failed on the user's input (asserts the form)."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
  return errors[0]


def prompt_rows(n: int, seed: int = 0) -> list:
  """{"prompt"} rows of the copy task (5 word tokens each)."""
  return [dict(prompt=row["prompt"]) for row in helpers.copy_rows(n, seed=seed)]


def tiny_reward_model(out_dir: str, seed: int = 0, normalization: dict | None = None) -> str:
  """A random tiny Llama reward model (transformers), the word tokenizer and, if given, a
  `reward_normalization.json`."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      pad_token_id=0, eos_token_id=1, bos_token_id=2, num_labels=1)
  transformers.LlamaForSequenceClassification(cfg).eval().save_pretrained(out_dir)
  helpers.word_tokenizer().save_pretrained(out_dir)
  if normalization is not None:
    with open(os.path.join(out_dir, "reward_normalization.json"), "w") as f:
      json.dump(normalization, f)
  return out_dir


def read_jsonl(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def word_count_reward(prompts: list, responses: list) -> list:
  """A reward function (`--reward_fn=command_helpers:word_count_reward`): response words
  that also appear in the prompt, minus a tenth of the others."""
  out = []
  for prompt, response in zip(prompts, responses):
    words = response.split()
    shared = sum(w in prompt.split() for w in words)
    out.append(shared - 0.1 * (len(words) - shared))
  return out
