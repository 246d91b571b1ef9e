"""Test fixtures shared by the trainer / launcher tests: tiny HF checkpoints and datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "b", "c", "d", "e", "good", "bad", "say", ":", "="]


def word_tokenizer():
  """A word-level fast tokenizer with pad/eos/bos, built in code (no downloads)."""
  import tokenizers
  import transformers
  specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
  vocab = {w: i for i, w in enumerate(specials + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
      unk_token="<unk>")


def tiny_hf_llama(out_dir: str, vocab_size: int = 16, seed: int = 0) -> str:
  """A random tiny Llama saved with transformers, plus the word tokenizer."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(out_dir)
  word_tokenizer().save_pretrained(out_dir)
  return out_dir


def copy_rows(n: int, seed: int = 0, length: int = 3) -> list:
  """SFT rows of the copy task the trainer tests learn: "say : a c b =" -> "a c b"."""
  import random
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    xs = [rng.choice("abcde") for _ in range(length)]
    rows.append(dict(prompt="say : " + " ".join(xs) + " =", completion=" ".join(xs)))
  return rows


def config_leaves(c, prefix: str = ""):
  """(dotted path, value) of every leaf field of an ml_collections ConfigDict."""
  import ml_collections
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from config_leaves(v, prefix + k + ".")
    else:
      yield prefix + k, v


def write_jsonl(path: str, rows) -> str:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return path


def launcher_cmd(config: str, workdir: str, *overrides: str) -> list:
  """The command line a user types for launch/train.py (progress bars off for logs)."""
  return [sys.executable, os.path.join(REPO, "launch", "train.py"),
          f"--config={os.path.join(REPO, config)}", f"--workdir={workdir}",
          "--config.train.progress=False", *overrides]


def launcher_env(**extra: str) -> dict:
  """This environment on the CPU backend, unbuffered, without the suite's 8 fake devices."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def run_launcher(config: str, workdir: str, *overrides: str, timeout: int = 300,
                 env_extra: dict | None = None):
  """Runs launch/train.py as a user would, in a subprocess; returns CompletedProcess."""
  return subprocess.run(launcher_cmd(config, workdir, *overrides), capture_output=True,
                        text=True, timeout=timeout, env=launcher_env(**(env_extra or {})),
                        cwd=REPO)


def read_metrics(workdir: str):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
