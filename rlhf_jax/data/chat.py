"""Chat templates: the end-of-turn text after an assistant reply, and the stop ids.

A chat template closes each assistant turn with its own text (``<|im_end|>``, ``<|eot_id|>``,
``<|end|>``, ``</s>``, ...). The loaders train on it and PPO must stop on it, so both derive
it here, the same way, from the template itself:

  * `closing_text(tokenizer)`: render a probe conversation (one user turn, one assistant
    turn, no generation prompt) and take what follows the assistant's content, minus
    trailing whitespace (the newline most templates put between turns belongs to the next
    turn's header, which the policy never samples). "" when the template has no chat
    template, writes nothing after the content, or cannot be probed.
  * `end_of_turn_ids(tokenizer)`: the special (added) tokens of that text, e.g. the id of
    ``<|end|>``. Ordinary tokens are never stop ids: stopping on e.g. "." would cut replies.
  * `stop_ids(tokenizer, model_dir=None)`: EOS, then the end-of-turn ids, then the EOS ids
    of ``<model_dir>/generation_config.json`` when given: what PPO passes to
    ``sampling.generate(eos_id=...)``.

`Tail` turns that into the token ids after a reply: SFT trains on content + closing + EOS
(EOS only when the closing does not already hold it); a comparison response (what the
reward model scores) ends at the first stop id of that tail, the token PPO would have
stopped on after sampling the same content.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence

log = logging.getLogger("rlhf_jax")

# Content of the probe turns: plain words no template rewrites (no whitespace to trim).
PROBE_USER = "rlhfjaxprobequestion"
PROBE_ASSISTANT = "rlhfjaxprobeanswer"


def closing_text(tokenizer: Any) -> str:
  """The text the chat template writes after an assistant reply's content ("" if none)."""
  if not getattr(tokenizer, "chat_template", None):
    return ""
  messages = [{"role": "user", "content": PROBE_USER},
              {"role": "assistant", "content": PROBE_ASSISTANT}]
  try:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
  except Exception as e:  # a template that rejects the probe: fall back to EOS only
    log.warning("chat template: could not render a probe conversation (%s: %s); assuming "
                "it writes nothing after an assistant reply", type(e).__name__, e)
    return ""
  at = text.rfind(PROBE_ASSISTANT) if isinstance(text, str) else -1
  if at < 0:
    log.warning("chat template: the assistant content does not appear in its rendering; "
                "assuming it writes nothing after an assistant reply")
    return ""
  return text[at + len(PROBE_ASSISTANT):].rstrip()


def _encode(tokenizer: Any, text: str) -> list[int]:
  if not text:
    return []
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer: Any) -> set:
  ids = set(getattr(tokenizer, "all_special_ids", None) or [])
  ids.update((getattr(tokenizer, "added_tokens_decoder", None) or {}).keys())
  return {int(i) for i in ids}


def end_of_turn_ids(tokenizer: Any) -> list[int]:
  """Ids of the special tokens that close an assistant turn (e.g. ``<|im_end|>``); [] if none."""
  special = _special_ids(tokenizer)
  bos = getattr(tokenizer, "bos_token_id", None)
  out: list[int] = []
  for t in _encode(tokenizer, closing_text(tokenizer)):
    if t in special and t != bos and t not in out:
      out.append(int(t))
  return out


def _generation_config_eos(model_dir: Optional[str]) -> list[int]:
  if not model_dir:
    return []
  path = os.path.join(model_dir, "generation_config.json")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    eos = json.load(f).get("eos_token_id")
  if eos is None:
    return []
  return [int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])]


def stop_ids(tokenizer: Any, model_dir: Optional[str] = None) -> list[int]:
  """Token ids that end a sampled reply: EOS, the template's end-of-turn ids, and (optional)
  the EOS ids of ``<model_dir>/generation_config.json``. EOS first, no duplicates.

  Pass the result as ``sampling.generate(..., eos_id=stop_ids(tokenizer))``; the reward
  model's comparison rows (`load_comparisons`) end at the same tokens.
  """
  out: list[int] = []
  eos = getattr(tokenizer, "eos_token_id", None)
  for t in ([] if eos is None else [int(eos)]) + end_of_turn_ids(tokenizer) + \
      _generation_config_eos(model_dir):
    if t not in out:
      out.append(t)
  return out


class Tail:
  """The token ids that follow a reply's content, for one tokenizer and stop set.

  Attributes:
    closing: ids of the template's end-of-turn text (`closing_text`), [] without one.
    sft: closing + EOS (EOS left out when the closing already holds it): SFT targets.
    stops: the stop ids a comparison response ends at.
  """

  def __init__(self, closing: Sequence[int], eos_id: int, stops: Sequence[int]):
    self.closing = list(closing)
    self.sft = self.closing + ([] if eos_id in self.closing else [eos_id])
    self.stops = set(int(s) for s in stops)

  def response(self, finished: bool = True) -> list[int]:
    """Ids after a comparison response: up to the first stop id; none when unfinished."""
    if not finished:
      return []
    for n, t in enumerate(self.sft):
      if t in self.stops:
        return self.sft[:n + 1]
    return list(self.sft)
