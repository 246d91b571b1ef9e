"""The "pretraining" corpus, the demonstrations, and the jsonl files the pipeline reads.

Pretraining documents (``pretraining_corpus``) are single lines, one per document, drawn
from the ``train`` prompts with the mix ``TaskConfig.mix()`` (defaults in brackets):

- ``filler`` [15 %]: plain rambling text, 3..12 filler words (``well so you think ...``);
- ``correct`` [30 %]: ``<prompt> <correct answer>``;
- ``wrong`` [17 %]: ``<prompt> <wrong answer of the right length>``;
- ``ramble`` [16 %]: ``<prompt> <correct answer> <1..8 filler words>``;
- ``invented`` [12 %]: ``<prompt> <correct answer> <1..3 letters/digits not in the prompt>``;
- ``unsafe`` [10 %]: a correct, wrong or rambling answer with the unsafe word inserted.

So instructions are followed well in only ~35 % of instruction documents: a model
pretrained on it is "misaligned" the way GPT-3 is. Documents contain no special tokens; the
trainer appends the tokenizer's EOS to each, so a document ends where its response ends.

Demonstrations (``demonstrations``) are ``{"prompt": "<kind> : <args> =", "completion":
"<correct answer>"}`` (no EOS in the text; the SFT trainer appends it). The prompt has no
trailing space and the completion no leading one: join them at the token level or with one
space, which tokenize identically (see ``tokenizer``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from rlhf_jax.tasks.instructions import (DIGITS, FILLER, LETTERS, SALT_CORPUS, SALT_DEMOS,
                                         UNSAFE, Prompt, TaskConfig, split_index,
                                         draw_prompt, sample_prompts)

CATEGORIES = ("filler", "correct", "wrong", "ramble", "invented", "unsafe")


def _words(rng, pool, lo_hi) -> list:
  n = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
  return [pool[i] for i in rng.integers(len(pool), size=n)]


def wrong_answer(rng: np.random.Generator, prompt: Prompt, config: TaskConfig) -> list:
  """A wrong answer of the correct length (letters of the prompt where possible)."""
  target = prompt.answer
  if prompt.kind == "count":
    options = [d for d in DIGITS[1:] if d != target[0]]
    return [options[rng.integers(len(options))]]
  pool = sorted(set(prompt.args))
  for _ in range(20):
    if rng.random() < 0.5:    # a shuffle of the arguments
      cand = [prompt.args[i] for i in rng.permutation(len(prompt.args))]
      cand = cand[:len(target)]
    else:                     # letters of the prompt drawn with replacement
      cand = [pool[i] for i in rng.integers(len(pool), size=len(target))]
    if cand != target:
      return cand
  # All arguments equal (e.g. "a a a"): change one position to another letter.
  others = [x for x in LETTERS[:max(config.n_letters, 2)] if x != target[0]]
  cand = list(target)
  cand[int(rng.integers(len(cand)))] = others[rng.integers(len(others))]
  return cand


def invented_words(rng: np.random.Generator, prompt: Prompt, lo_hi) -> list:
  """Letters/digits that cannot be derived from the prompt (not its args nor its answer)."""
  grounded = set(prompt.args) | set(prompt.answer)
  pool = [w for w in LETTERS + DIGITS if w not in grounded]
  return _words(rng, pool, lo_hi)


def make_document(rng: np.random.Generator, category: str, prompt: Prompt,
                  config: TaskConfig) -> str:
  """One pretraining document of `category` (see the module docstring)."""
  if category == "filler":
    return " ".join(_words(rng, FILLER, config.filler_doc_len))
  target = prompt.answer
  if category == "correct":
    response = target
  elif category == "wrong":
    response = wrong_answer(rng, prompt, config)
  elif category == "ramble":
    response = target + _words(rng, FILLER, config.ramble_len)
  elif category == "invented":
    response = target + invented_words(rng, prompt, config.invented_len)
  elif category == "unsafe":
    base = int(rng.integers(3))
    response = (target if base == 0 else wrong_answer(rng, prompt, config) if base == 1
                else target + _words(rng, FILLER, config.ramble_len))
    response = list(response)
    response.insert(int(rng.integers(len(response) + 1)), UNSAFE)
  else:
    raise ValueError(f"unknown corpus category {category!r}; expected one of {CATEGORIES}")
  return f"{prompt.text} {' '.join(response)}"


def pretraining_corpus(seed: int, n_docs: int, config: Optional[TaskConfig] = None,
                       return_categories: bool = False):
  """`n_docs` pretraining documents, deterministic in (seed, config).

  Args:
    seed: random seed.
    n_docs: number of documents.
    config: task sizes and mix; default ``TaskConfig()``.
    return_categories: also return each document's category (for tests and stats).

  Returns:
    list of str (one line per document, no EOS), or (docs, categories).
  """
  config = config or TaskConfig()
  rng = np.random.default_rng((seed, SALT_CORPUS))
  mix = config.mix()
  names = list(mix)
  probs = np.array([mix[k] for k in names], dtype=np.float64)
  cats = [names[i] for i in rng.choice(len(names), size=n_docs, p=probs / probs.sum())]
  docs = []
  for cat in cats:
    prompt = None if cat == "filler" else draw_prompt(rng, "train", config)
    docs.append(make_document(rng, cat, prompt, config))
  return (docs, cats) if return_categories else docs


def demonstrations(seed: int, n: int, split: str = "train",
                   config: Optional[TaskConfig] = None) -> list:
  """`n` demonstrations {"prompt", "completion"} of `split`: correct, concise answers."""
  config = config or TaskConfig()
  rng = np.random.default_rng((seed, SALT_DEMOS, split_index(split)))
  out = []
  for _ in range(n):
    p = draw_prompt(rng, split, config)
    out.append({"prompt": p.text, "completion": p.completion})
  return out


def _write_jsonl(path: str, rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)   # never a half-written file


def write_datasets(out_dir: str, seed: int, sizes: Optional[dict] = None,
                   config: Optional[TaskConfig] = None) -> dict:
  """Writes the task's datasets as jsonl files the HF-datasets loaders read.

  Files (and their default sizes, from ``TaskConfig``):

  - ``pretrain.jsonl`` {"text"}: the pretraining corpus (``n_pretrain``);
  - ``sft_train.jsonl`` {"prompt", "completion"}: demonstrations, train split (``n_sft_train``);
  - ``sft_eval.jsonl`` {"prompt", "completion"}: demonstrations, heldout split (``n_sft_eval``);
  - ``prompts_train.jsonl`` {"prompt"}: PPO / ranking prompts, train split (``n_prompts_train``);
  - ``prompts_eval.jsonl`` {"prompt"}: distinct evaluation prompts, eval split
    (``n_prompts_eval``).

  Args:
    out_dir: directory (created if missing).
    seed: random seed (each file has its own stream).
    sizes: overrides, keys ``pretrain``, ``sft_train``, ``sft_eval``, ``prompts_train``,
      ``prompts_eval``.
    config: task sizes and mix; default ``TaskConfig()``.

  Returns:
    {name: path} of the files written (name = file name without ``.jsonl``).
  """
  config = config or TaskConfig()
  n = dict(pretrain=config.n_pretrain, sft_train=config.n_sft_train,
           sft_eval=config.n_sft_eval, prompts_train=config.n_prompts_train,
           prompts_eval=config.n_prompts_eval)
  unknown = set(sizes or {}) - set(n)
  if unknown:
    raise ValueError(f"write_datasets sizes: unknown keys {sorted(unknown)}; "
                     f"expected some of {sorted(n)}")
  n.update(sizes or {})
  os.makedirs(out_dir, exist_ok=True)
  rows = dict(
      pretrain=[{"text": t} for t in pretraining_corpus(seed, n["pretrain"], config)],
      sft_train=demonstrations(seed, n["sft_train"], "train", config),
      sft_eval=demonstrations(seed, n["sft_eval"], "heldout", config),
      prompts_train=[{"prompt": p.text}
                     for p in sample_prompts(seed, n["prompts_train"], "train", config)],
      prompts_eval=[{"prompt": p.text} for p in
                    sample_prompts(seed, n["prompts_eval"], "eval", config, unique=True)],
  )
  paths = {}
  for name, data in rows.items():
    paths[name] = os.path.join(out_dir, f"{name}.jsonl")
    _write_jsonl(paths[name], data)
  return paths
