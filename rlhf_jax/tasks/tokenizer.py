"""The embedded task's tokenizer, built in code (no downloads).

A word-level `tokenizers` model over ``instructions.VOCAB`` (46 words; ids are the positions
in ``VOCAB``, so they never change): text is split on whitespace only, each word is one
token, a word outside the vocabulary becomes ``<unk>`` (id 3). Decoding joins tokens with
single spaces, so ``decode(encode(text)) == " ".join(text.split())`` for in-vocabulary text.

Wrapped as a ``transformers.PreTrainedTokenizerFast`` with ``pad_token="<pad>"`` (id 0),
``bos_token="<bos>"`` (1) and ``eos_token="<eos>"`` (2); ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` round-trip it. Encoding adds NO special tokens (no
BOS, no EOS): the trainers append ``eos_token_id`` themselves to each pretraining document
and each demonstration. ``<unk>`` is deliberately not registered as a transformers special
token, so ``decode(..., skip_special_tokens=True)`` keeps it visible (the oracle counts it as
invented content) while ``<pad>``, ``<bos>`` and ``<eos>`` are skipped.

Because words never merge, ``encode(prompt) + encode(completion) ==
encode(prompt + " " + completion)``: token-level and string-level concatenation agree.
"""

from __future__ import annotations

from rlhf_jax.tasks.instructions import BOS, EOS, PAD, UNK, VOCAB

MODEL_MAX_LENGTH = 256


def vocab() -> dict:
  """{word: id} of the task vocabulary."""
  return {w: i for i, w in enumerate(VOCAB)}


def build_tokenizer():
  """A fresh `transformers.PreTrainedTokenizerFast` for the embedded task."""
  import transformers
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel(vocab(), unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # Registered so that they are matched whole (even glued to a word) and skippable in decode.
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (PAD, BOS, EOS)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
      clean_up_tokenization_spaces=False, model_max_length=MODEL_MAX_LENGTH)
