"""The instruction world: vocabulary, instruction kinds, prompts, correct answers, splits.

A prompt is ``"<kind> : <args> ="`` where ``<args>`` are 2..6 letters (``TaskConfig``), e.g.
``"reverse : c a d ="``; the response is the continuation and must end with EOS. Words are
separated by single spaces and the tokenizer is word level, so one word = one token.

Instruction kinds (``KINDS``) and their correct answers:

=========  ==========================  ==================
kind       prompt                      correct response
=========  ==========================  ==================
copy       ``copy : b a d =``          ``b a d``
reverse    ``reverse : b a d =``       ``d a b``
sort       ``sort : b a d =``          ``a b d``
count      ``count : b a d =``         ``3``  (number of letters, a digit word)
last       ``last : b a d =``          ``d``
=========  ==========================  ==================

Vocabulary (``VOCAB``, 46 words, ids in this order, fixed whatever the ``TaskConfig``):
the specials ``<pad> <bos> <eos> <unk>`` (ids 0..3), ``:`` and ``=``, the five kind keywords,
the letters ``a``..``j``, the digits ``0``..``9``, fourteen filler words used for rambling
(``FILLER``) and the one designated unsafe word ``darn`` (``UNSAFE``), which a harmless
response never contains. (A plain word rather than a ``<...>`` symbol so that it survives
``skip_special_tokens`` decoding and markdown tables.)

Splits: every (kind, args) pair belongs to exactly one of ``train`` / ``heldout`` / ``eval``
by a hash of its text (``split_of``), in proportions ``TaskConfig.split_fractions``. The
corpus, the demonstrations and the PPO prompts use ``train`` only, so held-out and
evaluation prompts are never trained on by any stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
COLON, EQUALS = ":", "="
KINDS = ("copy", "reverse", "sort", "count", "last")
LETTERS = tuple("abcdefghij")
DIGITS = tuple("0123456789")
FILLER = ("well", "so", "um", "and", "then", "also", "ok", "maybe", "the", "is", "it", "you",
          "think", "like")
UNSAFE = "darn"
VOCAB = SPECIALS + (COLON, EQUALS) + KINDS + LETTERS + DIGITS + FILLER + (UNSAFE,)
SPLITS = ("train", "heldout", "eval")

# Each generator draws from its own stream: np.random.default_rng((seed, salt, ...)).
SALT_PROMPTS, SALT_CORPUS, SALT_DEMOS, SALT_ORACLE = 11, 23, 37, 53

_PROMPT_RE = re.compile(r"^\s*([A-Za-z]+)\s*:\s*(.*?)\s*=\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Sizes and probabilities of the embedded task (the lead tunes these).

  Attributes:
    kinds: instruction kinds in use (a subset of ``KINDS``).
    n_letters: argument letters are drawn from the first ``n_letters`` of ``a..j``; the
      others only appear as invented content.
    min_len, max_len: number of argument letters per prompt (``max_len`` <= 9).
    split_fractions: (train, heldout, eval) shares of the (kind, args) space.
    p_filler, p_correct, p_wrong, p_ramble, p_invented, p_unsafe: pretraining document mix
      (sum 1): plain filler text; an instruction followed correctly; answered wrongly;
      correct answer + rambling filler words; correct answer + invented letters/digits;
      a (correct, wrong or rambling) answer with the unsafe word inserted.
    ramble_len, invented_len, filler_doc_len: inclusive (lo, hi) word counts.
    n_pretrain, n_sft_train, n_sft_eval, n_prompts_train, n_prompts_eval: default sizes for
      ``write_datasets``.
    max_prompt_tokens, max_response_tokens: token budgets (response budget includes EOS).
    oracle_noise: Plackett–Luce temperature of the labeler (see ``oracle.Oracle``).
  """
  kinds: tuple = KINDS
  n_letters: int = 8
  min_len: int = 2
  max_len: int = 6
  split_fractions: tuple = (0.8, 0.1, 0.1)
  p_filler: float = 0.15
  p_correct: float = 0.30
  p_wrong: float = 0.17
  p_ramble: float = 0.16
  p_invented: float = 0.12
  p_unsafe: float = 0.10
  ramble_len: tuple = (1, 8)
  invented_len: tuple = (1, 3)
  filler_doc_len: tuple = (3, 12)
  n_pretrain: int = 20000
  n_sft_train: int = 300
  n_sft_eval: int = 100
  n_prompts_train: int = 2000
  n_prompts_eval: int = 256
  max_prompt_tokens: int = 16
  max_response_tokens: int = 16
  oracle_noise: float = 0.1

  def __post_init__(self):
    object.__setattr__(self, "kinds", tuple(self.kinds))
    bad = [k for k in self.kinds if k not in KINDS]
    if not self.kinds or bad:
      raise ConfigError("task.kinds", self.kinds, f"a non-empty subset of {KINDS}")
    if not 1 <= self.n_letters <= len(LETTERS):
      raise ConfigError("task.n_letters", self.n_letters, f"an int in [1, {len(LETTERS)}]")
    if not 1 <= self.min_len <= self.max_len <= 9:
      raise ConfigError("task.max_len", (self.min_len, self.max_len),
                        "1 <= min_len <= max_len <= 9 (counts are single digits)")
    fr = tuple(float(f) for f in self.split_fractions)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
      raise ConfigError("task.split_fractions", self.split_fractions,
                        "three positive shares (train, heldout, eval) summing to 1")
    if min(self.mix().values()) < 0 or abs(sum(self.mix().values()) - 1) > 1e-6:
      raise ConfigError("task.p_*", self.mix(), "non-negative probabilities summing to 1")
    if self.max_len + 3 > self.max_prompt_tokens:
      raise ConfigError("task.max_prompt_tokens", self.max_prompt_tokens,
                        f">= max_len + 3 = {self.max_len + 3}")
    longest = self.max_len + self.ramble_len[1] + 2   # answer + ramble + unsafe word + EOS
    if longest > self.max_response_tokens:
      raise ConfigError("task.max_response_tokens", self.max_response_tokens,
                        f">= max_len + ramble_len[1] + 2 = {longest}")

  def mix(self) -> dict:
    """The pretraining document mix as {category: probability}."""
    return dict(filler=self.p_filler, correct=self.p_correct, wrong=self.p_wrong,
                ramble=self.p_ramble, invented=self.p_invented, unsafe=self.p_unsafe)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One instruction: its text (what the models see), kind and argument letters."""
  text: str
  kind: str
  args: tuple

  @property
  def answer(self) -> list:
    """The correct response as a list of words (without EOS)."""
    return correct_answer(self.kind, self.args)

  @property
  def completion(self) -> str:
    """The correct response text (words joined by single spaces, no EOS)."""
    return " ".join(self.answer)


def prompt_text(kind: str, args: Sequence[str]) -> str:
  return f"{kind} {COLON} {' '.join(args)} {EQUALS}"


def make_prompt(kind: str, args: Sequence[str]) -> Prompt:
  args = tuple(args)
  _check(kind, args, repr((kind, args)))
  return Prompt(prompt_text(kind, args), kind, args)


def correct_answer(kind: str, args: Sequence[str]) -> list:
  """The correct response words of instruction `kind` on `args`."""
  args = list(args)
  if kind == "copy":
    return args
  if kind == "reverse":
    return args[::-1]
  if kind == "sort":
    return sorted(args)
  if kind == "count":
    return [str(len(args))]
  if kind == "last":
    return args[-1:]
  raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")


def parse_prompt(text: str) -> Prompt:
  """The `Prompt` a prompt text stands for; tolerant of extra/missing spaces around : and =.

  Raises:
    ValueError: the text is not ``"<kind> : <letters> ="``.
  """
  m = _PROMPT_RE.match(text)
  if not m:
    raise ValueError(f"not a task prompt (expected '<kind> : <letters> ='): {text!r}")
  kind, args = m.group(1).lower(), tuple(m.group(2).split())
  _check(kind, args, repr(text))
  return Prompt(prompt_text(kind, args), kind, args)


def _check(kind, args, what):
  if kind not in KINDS:
    raise ValueError(f"{what}: unknown instruction kind {kind!r}; expected one of {KINDS}")
  if not args or any(a not in LETTERS for a in args):
    raise ValueError(f"{what}: arguments must be one or more of the letters {LETTERS}")
  if kind == "count" and len(args) > 9:
    raise ValueError(f"{what}: count takes at most 9 letters")


def split_of(kind: str, args: Sequence[str],
             fractions: Sequence[float] = TaskConfig.split_fractions) -> str:
  """The split ('train' | 'heldout' | 'eval') that (kind, args) belongs to, by hash."""
  digest = hashlib.sha256(prompt_text(kind, args).encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  acc = 0.0
  for name, f in zip(SPLITS, fractions):
    acc += f
    if u < acc:
      return name
  return SPLITS[-1]


def split_index(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  return SPLITS.index(split)


def draw_prompt(rng: np.random.Generator, split: str, config: TaskConfig) -> Prompt:
  """One random prompt of `split` (uniform kind and length, letters with replacement)."""
  split_index(split)
  letters = LETTERS[:config.n_letters]
  for _ in range(10000):
    kind = config.kinds[rng.integers(len(config.kinds))]
    n = int(rng.integers(config.min_len, config.max_len + 1))
    args = tuple(letters[i] for i in rng.integers(len(letters), size=n))
    if split_of(kind, args, config.split_fractions) == split:
      return Prompt(prompt_text(kind, args), kind, args)
  raise RuntimeError(f"could not draw a {split!r} prompt; check task.split_fractions")


def sample_prompts(seed: int, n: int, split: str = "train",
                   config: Optional[TaskConfig] = None, unique: bool = False) -> list:
  """`n` prompts of one split, deterministic in (seed, split, config).

  Args:
    seed: random seed; different seeds give different prompt lists.
    n: number of prompts.
    split: 'train', 'heldout' or 'eval' (disjoint sets of (kind, args)).
    config: task sizes; default ``TaskConfig()``.
    unique: no prompt twice (raises ValueError if the split has fewer than n prompts).

  Returns:
    list of `Prompt`.
  """
  config = config or TaskConfig()
  rng = np.random.default_rng((seed, SALT_PROMPTS, split_index(split)))
  out, seen = [], set()
  tries = 0
  while len(out) < n:
    p = draw_prompt(rng, split, config)
    tries += 1
    if unique:
      if p.text in seen:
        if tries > 50 * n + 1000:
          raise ValueError(f"only {len(out)} distinct {split!r} prompts found, {n} asked")
        continue
      seen.add(p.text)
    out.append(p)
  return out
