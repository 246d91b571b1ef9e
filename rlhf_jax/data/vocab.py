"""Tokenizer helpers: encoding rows, chat templates, BOS policy and tokenizer checks.

BOS policy (`add_bos` of every loader):

  * ``None`` (default): do what the tokenizer does on ``tokenizer(text)`` — if that puts
    ``bos_token`` in front of the text, we put it in front of every sequence, else not;
  * ``True``: always put ``bos_token`` first (an error if the tokenizer has none);
  * ``False``: never.

"First" means before the prompt (SFT, comparisons, prompts) or before each document (text).
A sequence that already starts with BOS (e.g. a chat template that writes ``<s>``) never
gets a second one. Everything else is tokenized with ``add_special_tokens=False``; EOS is
appended by the loaders.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from rlhf_jax.data import chat
from rlhf_jax.data.validate import BadRow, DataError, short_repr

PROBE = "Hello, world! 123 héllo\n\tañ 日本 <|x|>"
CHUNK = 2048  # texts per batched tokenizer call


class Encoder:
  """Tokenizes texts for one load; knows pad / eos / bos ids and the chat template."""

  def __init__(self, tokenizer, add_bos: Optional[bool], file: str):
    self.tokenizer, self.file = tokenizer, file
    for attr in ("eos", "pad"):
      if getattr(tokenizer, f"{attr}_token_id", None) is None:
        raise DataError(f"{file}: the tokenizer has no {attr}_token; {_FIX[attr]}")
    self.eos_id = int(tokenizer.eos_token_id)
    self.pad_id = int(tokenizer.pad_token_id)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
      add_bos = bos is not None and _default_adds_bos(tokenizer, bos)
    elif add_bos and bos is None:
      raise DataError(f"{file}: add_bos=True but the tokenizer has no bos_token; set "
                      "add_bos=None/False or tokenizer.bos_token")
    self.bos_id: Optional[int] = int(bos) if add_bos else None
    self._backend = _fast_backend(tokenizer)

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.tokenizer, "chat_template", None))

  def with_bos(self, ids: list[int]) -> list[int]:
    if self.bos_id is None or (ids and ids[0] == self.bos_id):
      return ids
    return [self.bos_id] + ids

  def encode(self, texts: Sequence[str]) -> list[Union[list[int], BadRow]]:
    """Token ids of each text (no special tokens); a `BadRow` where the tokenizer failed."""
    out: list = []
    for lo in range(0, len(texts), CHUNK):
      chunk = list(texts[lo:lo + CHUNK])
      try:
        out.extend(self._call(chunk))
      except Exception:  # one bad text fails the batch: redo one by one to find it
        for text in chunk:
          try:
            out.extend(self._call([text]))
          except Exception as e:
            out.append(BadRow("tokenizer_error", "<text>", "text the tokenizer accepts",
                              f"{type(e).__name__}: {e}"))
    return out

  def _call(self, texts: list[str]) -> list[list[int]]:
    if self._backend is not None:
      return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
    ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in ids]

  def tail(self, use_chat: bool, stops: Optional[Sequence[int]] = None) -> chat.Tail:
    """Ids after a reply: the template's closing (chat rows only) + EOS (see `chat.Tail`).

    Args:
      use_chat: rows are chats rendered with the template (plain rows: EOS only).
      stops: where comparison responses end; None = `chat.stop_ids(tokenizer)`.
    """
    closing: list[int] = []
    text = chat.closing_text(self.tokenizer) if use_chat else ""
    if text:
      ids = self.encode([text])[0]
      if isinstance(ids, BadRow):
        raise DataError(f"{self.file}: the tokenizer cannot encode its own chat template's "
                        f"end-of-turn text {text!r}: {ids.got}")
      closing = ids
    if stops is None:
      stops = chat.stop_ids(self.tokenizer)
    return chat.Tail(closing, self.eos_id, stops)

  def render_chat(self, messages: list[dict], column: str,
                  add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages`; `BadRow` if the template rejects them."""
    try:
      text = self.tokenizer.apply_chat_template(
          messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja raises for e.g. roles that do not alternate
      raise BadRow("template_error", column, "messages the chat template accepts",
                   f"{type(e).__name__}: {e}") from None
    if not isinstance(text, str):
      raise BadRow("template_error", column, "the chat template to render a string",
                   text)
    return text


_FIX = {
    "eos": "sequences end with EOS (the reward model reads its score there); use a "
           "tokenizer with an eos_token or set tokenizer.eos_token before loading.",
    "pad": "set one before loading, e.g. tokenizer.pad_token = tokenizer.eos_token (masks "
           "are explicit, so reusing EOS for padding is safe).",
}


def _fast_backend(tokenizer):
  """The Rust `tokenizers.Tokenizer` behind a fast tokenizer, if it encodes like the wrapper.

  Calling it directly skips the wrapper's per-text conversion (about 2x faster on 100k
  rows); the probe comparison keeps us on the wrapper for any tokenizer that adds logic.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None or not hasattr(backend, "encode_batch"):
    return None
  try:
    want = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    got = backend.encode_batch([PROBE], add_special_tokens=False)[0].ids
  except Exception:
    return None
  return backend if list(got) == want else None


def _default_adds_bos(tokenizer, bos: int) -> bool:
  try:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
  except Exception:
    return False
  return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


def check_tokenizer(tokenizer: Any, vocab_size: int, name: str = "model") -> None:
  """Checks that `tokenizer` fits a model with `vocab_size` embeddings and has pad / eos.

  Args:
    tokenizer: a `transformers` tokenizer.
    vocab_size: the model's vocabulary size (rows of its embedding).
    name: what the model is, for the message (e.g. "policy from runs/sft/export").

  Raises:
    DataError: saying what does not fit and how to fix it.
  """
  n = len(tokenizer)
  if n > vocab_size:
    raise DataError(
        f"{name}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}, "
        "so some token ids have no embedding. Use the tokenizer saved with the model "
        f"(config.tokenizer / the model directory), or a model with vocab_size >= {n}.")
  for attr in ("eos", "pad"):
    if getattr(tokenizer, f"{attr}_token_id", None) is None:
      raise DataError(f"{name}: the tokenizer has no {attr}_token; {_FIX[attr]}")
  for attr in ("eos", "pad", "bos"):
    token_id = getattr(tokenizer, f"{attr}_token_id", None)
    if token_id is not None and not 0 <= token_id < vocab_size:
      raise DataError(f"{name}: {attr}_token_id={token_id} is outside the model's "
                      f"vocabulary [0, {vocab_size}); the tokenizer does not belong to it")


def check_same_tokenizer(tok_a: Any, tok_b: Any,
                         names: tuple[str, str] = ("policy", "reward model")) -> None:
  """Checks that two tokenizers map text to the same ids (policy vs reward model).

  Compares the vocabularies, the eos / bos ids and the encoding of a probe string.

  Raises:
    DataError: naming the first difference and the fix.
  """
  a, b = names
  fix = (f"The {b} scores the {a}'s token ids, so both must use one tokenizer: train the "
         f"{b} from the {a}'s SFT checkpoint or pass the same tokenizer to both.")
  if tok_a is tok_b:
    return
  va, vb = tok_a.get_vocab(), tok_b.get_vocab()
  if va != vb:
    if len(va) != len(vb):
      what = f"{len(va)} vs {len(vb)} tokens"
    else:
      token = next(t for t in sorted(va) if va.get(t) != vb.get(t))
      what = f"token {short_repr(token)} is id {va.get(token)} vs {vb.get(token)}"
    raise DataError(f"the {a} and {b} tokenizers differ ({what}). {fix}")
  for attr in ("eos", "bos"):
    ia, ib = getattr(tok_a, f"{attr}_token_id", None), getattr(tok_b, f"{attr}_token_id", None)
    if ia != ib:
      raise DataError(f"the {a} and {b} tokenizers have different {attr}_token_id "
                      f"({ia} vs {ib}). {fix}")
  ea = tok_a(PROBE, add_special_tokens=False)["input_ids"]
  eb = tok_b(PROBE, add_special_tokens=False)["input_ids"]
  if list(ea) != list(eb):
    raise DataError(f"the {a} and {b} tokenizers encode {PROBE!r} differently "
                    f"({list(ea)} vs {list(eb)}). {fix}")
