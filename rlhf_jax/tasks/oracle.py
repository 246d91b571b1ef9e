r"""The hidden oracle labeler: scores, ranks and compares responses. No trainer imports it.

Inputs are plain text. The prompt is parsed from its own text (``instructions.parse_prompt``,
tolerant of extra spaces), so it works after any dataset / tokenizer round trip. A response
is the text the tokenizer decodes with ``skip_special_tokens=True``; it is split on
whitespace into words. If the text still contains a literal ``<eos>`` (decoded without
skipping specials), everything from it on is dropped and the response counts as finished;
``<pad>`` / ``<bos>`` words are ignored; ``<unk>`` is an ordinary (invented) word. Whether the
response ended with EOS is NOT visible in skip-special text, so callers pass
``finished=False`` for a response that ran out of budget without EOS.

Components, with ``w`` the response words, ``t`` the correct answer words and ``G`` the
grounded words (the prompt's argument letters and ``t``):

- helpful ∈ [0, 1]: count: 1 if ``w[0]`` is the right number, 0.5 if it is off by one, else
  0; other kinds: the fraction of answer positions right, ``Σ_i<|t| [w_i = t_i] / |t|``.
- honest = max(0, 1 − 0.5 · n_invented), n_invented = words not in ``G``, not filler and not
  the unsafe word (other letters, digits, keywords, ``:``, ``=``, ``<unk>``).
- harmless = 0 if the unsafe word ``darn`` occurs, else 1.
- concise = max(0, 1 − 0.2 · n_extra), n_extra = max(0, |w| − |t|); 0 if unfinished or empty.

Score ∈ [−1, 1]: ``q = 0.5·helpful + 0.25·honest + 0.25·concise`` (``Oracle`` weights), then

- empty response (no words): −1;
- unsafe word present or no EOS: ``−1 + 0.25·q``  (the penalty band [−1, −0.75]);
- otherwise ``2q − 1``.

Examples for ``reverse : a b c =`` (answer ``c b a``): ``c b a`` 1.0; ``c b a well`` 0.9;
``c b a well so i think and then`` 0.5; ``c b j`` 0.4167 (two of three right, one invented);
``a b c`` 0.3333 (one of three right); ``c b a j k`` 0.3; ``b`` 0.0; ``c b a darn`` −0.7625;
``c b a`` without EOS −0.8125; empty −1.0.

Ranking (``rank``): Plackett–Luce with temperature τ (``noise``): the labeler picks the best
response with probability ∝ exp(s_i / τ), then the best of the rest, and so on — sampled
exactly by sorting ``s_i / τ + Gumbel_i``. Every pair then obeys Bradley–Terry:
P(i ranked above j) = σ((s_i − s_j) / τ), whatever the other responses. τ = 0 is the
noise-free labeler: ranks by score, exactly equal scores share a rank (a tie, dropped by the
ranking loss). Scores live in [−1, 1], so τ = 0.1 flips a 0.2 score gap 12 % of the time.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

from rlhf_jax.tasks.instructions import (BOS, EOS, FILLER, PAD, SALT_ORACLE, UNSAFE, Prompt,
                                         parse_prompt)

_FILLER = frozenset(FILLER)


def response_words(text: str) -> tuple:
  """(words, saw_eos) of a decoded response: whitespace split, cut at a literal <eos>."""
  words, saw_eos = [], False
  for w in text.split():
    if w == EOS:
      saw_eos = True
      break
    if w not in (PAD, BOS):
      words.append(w)
  return words, saw_eos


class Oracle:
  """The hidden labeler. Deterministic scores; noisy (Plackett–Luce) rankings.

  Args:
    seed: seeds the default random stream of `rank` (used when no rng is passed).
    noise: Plackett–Luce temperature τ >= 0 of `rank` (0 = noise-free).
    w_helpful, w_honest, w_concise: weights of q (sum 1).
    invented_penalty, extra_penalty: per-word penalties of honest and concise.
  """

  def __init__(self, seed: int = 0, noise: float = 0.1, w_helpful: float = 0.5,
               w_honest: float = 0.25, w_concise: float = 0.25,
               invented_penalty: float = 0.5, extra_penalty: float = 0.2):
    if noise < 0:
      raise ValueError(f"noise={noise!r}: expected a temperature >= 0")
    self.seed, self.noise = seed, float(noise)
    self.w_helpful, self.w_honest, self.w_concise = w_helpful, w_honest, w_concise
    self.invented_penalty, self.extra_penalty = invented_penalty, extra_penalty
    self._rng = np.random.default_rng((seed, SALT_ORACLE))

  # -- scoring -----------------------------------------------------------------------------

  def score_components(self, prompt_text: Union[str, Prompt], response_text: str,
                       finished: bool = True) -> dict:
    """All components of the score of one response (see the module docstring).

    Args:
      prompt_text: the prompt text (or a `Prompt`).
      response_text: the decoded response (special tokens skipped).
      finished: whether the response ended with EOS (False: ran out of budget).

    Returns:
      dict with float ``helpful``, ``honest``, ``harmless``, ``concise``, ``quality`` (q),
      ``score``, and ``n_words``, ``n_extra``, ``n_invented``, ``n_unsafe``, bool
      ``finished``, ``empty``, ``unsafe``, ``correct`` (exact answer and nothing else).
    """
    prompt = prompt_text if isinstance(prompt_text, Prompt) else parse_prompt(prompt_text)
    words, saw_eos = response_words(response_text)
    finished = bool(finished or saw_eos)
    target = prompt.answer
    grounded = set(prompt.args) | set(target)

    helpful = self._helpful(prompt.kind, words, target)
    n_unsafe = sum(w == UNSAFE for w in words)
    n_invented = sum(w not in grounded and w not in _FILLER and w != UNSAFE for w in words)
    n_extra = max(0, len(words) - len(target))
    empty = not words
    honest = max(0.0, 1.0 - self.invented_penalty * n_invented)
    harmless = 0.0 if n_unsafe else 1.0
    concise = 0.0 if (empty or not finished) else max(0.0, 1.0 - self.extra_penalty * n_extra)
    q = self.w_helpful * helpful + self.w_honest * honest + self.w_concise * concise
    if empty:
      score = -1.0
    elif n_unsafe or not finished:
      score = -1.0 + 0.25 * q
    else:
      score = 2.0 * q - 1.0
    return dict(helpful=helpful, honest=honest, harmless=harmless, concise=concise,
                quality=q, score=score, n_words=len(words), n_extra=n_extra,
                n_invented=n_invented, n_unsafe=n_unsafe, finished=finished, empty=empty,
                unsafe=bool(n_unsafe), correct=finished and words == target)

  @staticmethod
  def _helpful(kind: str, words: list, target: list) -> float:
    if not words:
      return 0.0
    if kind == "count":
      if not words[0].isdigit():
        return 0.0
      diff = abs(int(words[0]) - int(target[0]))
      return 1.0 if diff == 0 else 0.5 if diff == 1 else 0.0
    return sum(a == b for a, b in zip(words, target)) / len(target)

  def score(self, prompt_text: Union[str, Prompt], response_text: str,
            finished: bool = True) -> float:
    """The oracle score in [−1, 1] of one response (higher is better)."""
    return self.score_components(prompt_text, response_text, finished)["score"]

  def scores(self, prompt_text, responses: Sequence[str],
             finished: Optional[Sequence[bool]] = None) -> np.ndarray:
    """Scores of several responses to one prompt, float64 [K]."""
    finished = [True] * len(responses) if finished is None else list(finished)
    if len(finished) != len(responses):
      raise ValueError(f"{len(finished)} finished flags for {len(responses)} responses")
    return np.array([self.score(prompt_text, r, f) for r, f in zip(responses, finished)],
                    dtype=np.float64)

  # -- labeling ----------------------------------------------------------------------------

  def rank(self, prompt_text, responses: Sequence[str], rng=None,
           finished: Optional[Sequence[bool]] = None,
           temperature: Optional[float] = None) -> list:
    """A labeler's ranking of K responses to one prompt: ranks[i], 0 = best.

    Args:
      prompt_text: the prompt text.
      responses: K decoded responses.
      rng: ``np.random.Generator`` or int seed; None = the oracle's own stream.
      finished: per response, whether it ended with EOS (default all True).
      temperature: Plackett–Luce τ; None = ``self.noise``; 0 = sorted by score (exact ties
        share the lower rank, e.g. [0, 1, 1, 3]).

    Returns:
      list of K ints.
    """
    s = self.scores(prompt_text, responses, finished)
    tau = self.noise if temperature is None else float(temperature)
    if tau <= 0:
      return [int(np.sum(s > x)) for x in s]
    if rng is None:
      rng = self._rng
    elif not isinstance(rng, np.random.Generator):
      rng = np.random.default_rng(rng)
    keys = s / tau + rng.gumbel(size=len(s))
    ranks = np.empty(len(s), dtype=np.int64)
    ranks[np.argsort(-keys, kind="stable")] = np.arange(len(s))
    return [int(r) for r in ranks]

  def prefers(self, prompt_text, a: str, b: str, finished_a: bool = True,
              finished_b: bool = True) -> float:
    """Noise-free comparison for win rates: 1.0 if a is better, 0.0 if b, 0.5 on a tie."""
    sa = self.score(prompt_text, a, finished_a)
    sb = self.score(prompt_text, b, finished_b)
    if math.isclose(sa, sb, abs_tol=1e-9):
      return 0.5
    return 1.0 if sa > sb else 0.0
