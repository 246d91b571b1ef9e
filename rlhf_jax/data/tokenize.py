"""Rows -> static-shape int32 token arrays, one loader per dataset format.

Each loader opens `spec` (see `sources`), checks every row (see `validate` for the bad-row
reasons), tokenizes with ``add_special_tokens=False`` plus the BOS policy of `vocab`, and
returns a `TokenArrays`. Nothing is truncated: a row that does not fit is a bad row. Prompt
and response are tokenized separately and concatenated, so the prompt/response boundary is
exact (and the same one the PPO sampler sees).

  load_sft(spec, tok, max_prompt_len, max_len)
      rows: prompt + completion, or chat ``messages`` (needs ``tokenizer.chat_template``:
      prompt = template of all messages but the last, with the generation prompt;
      completion = the last, assistant, message's content + the template's end-of-turn
      text, `chat.closing_text`).
      input_ids / attention_mask / loss_mask [N, max_len], right padded;
      sequence = [bos] + prompt + completion + eos (eos left out when the end-of-turn text
      already holds it); loss_mask = 1 on completion + end-of-turn + eos.
  load_comparisons(spec, tok, max_prompt_len, max_len, k_max)
      rows: prompt + chosen + rejected (K = 2, ranks [0, 1]), or prompt + ``responses``
      (list) + ``ranks`` (ints, lower = better, ties allowed). Ranks are made dense
      from 0 (ranks [3, 1, 1] -> [1, 0, 0]). Chat rows: ``messages`` (the prompt
      conversation, not ending with an assistant turn) instead of prompt, rendered exactly as
      `load_prompts` renders PPO prompts; each response is a string or an assistant message
      ({role: assistant, content}, or a list of one) and is followed by the template's
      end-of-turn text. Optional ``finished`` (a bool per response, [chosen, rejected] for
      pairs): a response with finished=False was cut off and gets nothing appended.
      input_ids / attention_mask [N, k_max, max_len] (sequence = [bos] + prompt + response
      + end, right padded; end = eos for plain rows, for chats the end-of-turn text up to
      its first stop id (`chat.stop_ids`), nothing when unfinished), last_index [N, k_max]
      (the last token: the token PPO scores after sampling that response), ranks
      [N, k_max] int32, valid [N, k_max] bool. Padding slots: pad ids, mask 0,
      last_index 0, rank k_max, valid False.
  load_prompts(spec, tok, max_prompt_len)
      rows: prompt, or ``messages`` (a trailing assistant turn is dropped; rendered with the
      generation prompt). input_ids / attention_mask [N, max_prompt_len], LEFT padded;
      `.texts` holds the prompt strings as tokenized (rendered template for chats).
  load_text(spec, tok, seq_len, pack=True)
      rows: text. Documents are [bos] + text + eos. pack=True: concatenated in row order and
      cut into [N, seq_len] chunks (the last one right padded; attention crosses document
      boundaries, as in GPT pretraining); pack=False: one document per row, right padded,
      longer ones are bad rows. input_ids / attention_mask / loss_mask (= attention_mask).

Trailing whitespace of plain prompts: BPE tokenizers attach a space to the word after it
("Answer: 42" -> "Answer", ":", " 42"), so a prompt ending in a space, tokenized on its
own, ends in a lone space token that joint text never produces. The plain-row loaders move
such whitespace to the start of the completion / each response, and `load_prompts` drops it
(the policy samples it as the start of its reply, as SFT taught it); the number of prompts
changed is `DataReport.notes["prompt_trailing_whitespace"]`, logged once per load. Chat
prompts are left as the template renders them.

All loaders take ``add_bos: bool | None = None`` (see `vocab`). Which columns hold which
role is `DataSpec.columns`; with no explicit choice, a dataset is read as chat ``messages``
when it has a messages column and no prompt column, and as ranked comparisons when it has a
responses column and no chosen column. `TokenArrays.format` says which ("chat" / "plain").
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import numpy as np

from rlhf_jax.data.sources import DataSpec, open_source
from rlhf_jax.data.validate import (BadRow, DataError, DataReport, RowLedger, check_text,
                                    get_finished, get_list, get_messages,
                                    get_prompt_messages, get_ranks, get_response, get_text,
                                    get_value)
from rlhf_jax.data.vocab import Encoder

log = logging.getLogger("rlhf_jax")
TRAILING_SPACE = "prompt_trailing_whitespace"  # the `DataReport.notes` key


@dataclasses.dataclass
class TokenArrays:
  """A loaded dataset.

  Attributes:
    arrays: name -> numpy array, all with the same leading dimension N.
    report: the `DataReport` (rows read, used, skipped by reason).
    texts: prompt strings (`load_prompts` only), aligned with the arrays.
    row_ids: [N] source row index of each example (None for packed text).
    format: "chat" (rows were chat messages rendered with the tokenizer's chat template) or
      "plain" (prompt / completion / response / text columns). Training a reward model on
      plain rows for a policy fine-tuned on chats (or the reverse) scores text laid out
      unlike anything PPO samples; compare the two datasets' formats.
  """
  arrays: dict
  report: DataReport
  texts: Optional[list] = None
  row_ids: Optional[np.ndarray] = None
  format: str = "plain"

  @property
  def is_chat(self) -> bool:
    return self.format == "chat"

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))


class _Load:
  """Shared state of one load: rows, encoder, bad-row ledger."""

  def __init__(self, spec: DataSpec, tokenizer: Any, add_bos: Optional[bool]):
    if not isinstance(spec, DataSpec):
      raise DataError(f"expected a data.DataSpec, got {type(spec).__name__}")
    self.spec = spec
    self.enc = Encoder(tokenizer, add_bos, spec.path)
    self.source = open_source(spec)
    self.ledger = RowLedger(spec.path, spec.on_bad_row, self.source.locate)
    self.moved: set = set()  # rows whose prompt's trailing whitespace was moved
    self.index = -1          # the row `parse` is reading

  def chat_mode(self, primary: str) -> bool:
    """Whether rows are read as `messages` instead of `primary` text."""
    cols = self.spec.columns
    if primary in cols or "messages" in cols:
      use = "messages" in cols and primary not in cols
    else:
      keys = self.source.columns()
      use = self.spec.column(primary) not in keys and self.spec.column("messages") in keys
    if use and not self.enc.has_chat_template:
      raise DataError(f"{self.spec.path}: column {self.spec.column('messages')!r} holds chat "
                      "messages but the tokenizer has no chat_template; use a tokenizer with "
                      f"one, or give {primary!r} text columns instead.")
    return use

  def encode(self, parsed: dict, fields: list) -> dict:
    """{row: [text, ...]} -> {row: [ids, ...]}; rows whose text fails become bad rows."""
    flat, owners = [], []
    for i, texts in parsed.items():
      for j, text in enumerate(texts):
        flat.append(text)
        owners.append((i, j))
    out: dict = {}
    for k, ids in enumerate(self.enc.encode(flat)):
      i, j = owners[k]
      field = fields[min(j, len(fields) - 1)]
      if isinstance(ids, BadRow):
        ids.field = field
        self.ledger.bad(i, ids)
      elif not ids:
        self.ledger.bad(i, BadRow("empty", field, "text with at least one token", flat[k]))
      out.setdefault(i, []).append(ids)
    return {i: v for i, v in out.items() if not self.ledger.is_bad(i)}

  def parse(self, fn) -> dict:
    """{row: fn(row)} over rows where `fn` does not raise `BadRow`."""
    parsed = {}
    for i, row in enumerate(self.source.rows):
      self.index = i
      try:
        parsed[i] = fn(row)
      except BadRow as e:
        self.ledger.bad(i, e)
    return parsed

  def move_space(self, prompt: str, rest: Sequence[str]) -> list:
    """[prompt without trailing whitespace, *rest each prefixed with it] (module docstring).

    Called from a `parse` function: the row is `self.index`.
    """
    stripped = prompt.rstrip()
    if len(stripped) == len(prompt):
      return [prompt, *rest]
    self.moved.add(self.index)
    space = prompt[len(stripped):]
    return [stripped, *(space + r for r in rest)]

  def finish(self, used: list, field: str,
             moved: str = "moved it to the start of the completion") -> DataReport:
    report = self.ledger.finish(len(self.source.rows), len(used))
    report.raise_if_empty(field)
    count = len(self.moved.intersection(used))
    if count:
      report.notes[TRAILING_SPACE] = count
      log.warning("%s: %d of %d prompts ended in whitespace; %s, so that token ids match "
                  "the tokenization of the joint text", self.spec.path, count, len(used),
                  moved)
    return report


def _positive(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f"{name}={value!r}: expected an int >= {minimum}")
  return int(value)


def _pad_right(seqs: list, length: int, pad: int, lead: tuple = ()) -> tuple:
  ids = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for n, seq in enumerate(seqs):
    ids[n, :len(seq)] = seq
    mask[n, :len(seq)] = 1
  return ids, mask


def load_sft(spec: DataSpec, tokenizer: Any, max_prompt_len: int, max_len: int,
             add_bos: Optional[bool] = None) -> TokenArrays:
  """Demonstrations for SFT (see module docstring).

  Args:
    spec: the dataset.
    tokenizer: a `transformers` tokenizer with pad and eos tokens.
    max_prompt_len: longest prompt in tokens (incl. bos); longer rows are bad rows.
    max_len: sequence length T; prompt + completion + eos longer than T is a bad row.
    add_bos: BOS policy (see `vocab`).

  Returns:
    `TokenArrays` with input_ids, attention_mask, loss_mask: int32 [N, max_len]; `.format`.

  Raises:
    DataError: on a bad row with ``on_bad_row="error"``, or when no row is usable.
  """
  max_prompt_len, max_len = _positive("max_prompt_len", max_prompt_len), \
      _positive("max_len", max_len)
  ld = _Load(spec, tokenizer, add_bos)
  chat = ld.chat_mode("prompt")
  tail = ld.enc.tail(chat).sft
  col_p, col_c, col_m = (spec.column(r) for r in ("prompt", "completion", "messages"))

  def parse(row):
    if chat:
      msgs = get_messages(row, col_m, final_assistant=True)
      return [ld.enc.render_chat(msgs[:-1], col_m), msgs[-1]["content"]]
    return ld.move_space(get_text(row, col_p), [get_text(row, col_c)])

  fields = [col_m, col_m] if chat else [col_p, col_c]
  encoded = ld.encode(ld.parse(parse), fields)
  used, seqs, prompt_lens = [], [], []
  for i, (p, c) in encoded.items():
    p = ld.enc.with_bos(p)
    seq = p + c + tail
    if len(p) > max_prompt_len:
      ld.ledger.bad(i, BadRow("prompt_too_long", fields[0], f"at most {max_prompt_len} "
                              f"prompt tokens", f"{len(p)} tokens"))
    elif len(seq) > max_len:
      ld.ledger.bad(i, BadRow("too_long", fields[1], f"prompt + completion + eos within "
                              f"max_len={max_len} tokens", f"{len(seq)} tokens"))
    else:
      used.append(i), seqs.append(seq), prompt_lens.append(len(p))
  report = ld.finish(used, fields[1])
  ids, mask = _pad_right(seqs, max_len, ld.enc.pad_id)
  loss_mask = mask.copy()
  for n, plen in enumerate(prompt_lens):
    loss_mask[n, :plen] = 0
  return TokenArrays(dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask), report,
                     row_ids=np.asarray(used, np.int64), format=_format(chat))


def _format(chat: bool) -> str:
  return "chat" if chat else "plain"


def load_comparisons(spec: DataSpec, tokenizer: Any, max_prompt_len: int, max_len: int,
                     k_max: int, add_bos: Optional[bool] = None,
                     stop_ids: Optional[Sequence[int]] = None) -> TokenArrays:
  """Ranked responses for the reward model (see module docstring).

  Args:
    spec: the dataset.
    tokenizer: a `transformers` tokenizer with pad and eos tokens.
    max_prompt_len: longest prompt in tokens (incl. bos).
    max_len: sequence length T of each prompt + response + eos.
    k_max: the K dimension; rows with more responses are bad rows. 0: K is taken from the
      data (the most responses any usable row has; 2 for chosen / rejected pairs).
    add_bos: BOS policy (see `vocab`).
    stop_ids: the ids PPO stops sampling on (`sampling.generate(eos_id=...)`); a chat
      response ends at the first of them in its end-of-turn text + eos. None:
      `data.stop_ids(tokenizer)`. Plain rows always end with eos.

  Returns:
    `TokenArrays` with input_ids, attention_mask [N, k_max, max_len] int32, last_index,
    ranks [N, k_max] int32 and valid [N, k_max] bool; `.format`.
  """
  max_prompt_len, max_len = _positive("max_prompt_len", max_prompt_len), \
      _positive("max_len", max_len)
  from_data = k_max == 0   # K = the most responses any row has
  k_max = 0 if from_data else _positive("k_max", k_max, 2)
  ld = _Load(spec, tokenizer, add_bos)
  chat = ld.chat_mode("prompt")
  tail = ld.enc.tail(chat, stop_ids)
  col = {r: spec.column(r) for r in ("prompt", "messages", "chosen", "rejected", "responses",
                                     "ranks", "finished")}
  if any(r in spec.columns for r in ("responses", "ranks")):
    ranked = True
  elif any(r in spec.columns for r in ("chosen", "rejected")):
    ranked = False
  else:
    keys = ld.source.columns()
    ranked = col["chosen"] not in keys and col["responses"] in keys
  prompt_field = col["messages"] if chat else col["prompt"]
  read = get_response if chat else check_text

  def parse(row):
    if chat:
      prompt = ld.enc.render_chat(get_prompt_messages(row, prompt_field), prompt_field)
    else:
      prompt = get_text(row, prompt_field)
    if not ranked:
      texts = [read(get_value(row, col[r]), col[r]) for r in ("chosen", "rejected")]
      levels = [0, 1]
    else:
      texts, levels = _ranked(row, col, k_max or np.iinfo(np.int32).max, read)
    finished = get_finished(row, col["finished"], len(texts))
    if not chat:
      prompt, *texts = ld.move_space(prompt, texts)
    return [prompt] + texts, levels, finished

  parsed = ld.parse(parse)
  resp_field = col["responses"] if ranked else col["chosen"]
  encoded = ld.encode({i: v[0] for i, v in parsed.items()}, [prompt_field, resp_field])
  used, rows_out = [], []
  for i, (p, *responses) in encoded.items():
    p = ld.enc.with_bos(p)
    finished = parsed[i][2] or [True] * len(responses)
    seqs = [p + r + tail.response(f) for r, f in zip(responses, finished)]
    longest = max(len(s) for s in seqs)
    if len(p) > max_prompt_len:
      ld.ledger.bad(i, BadRow("prompt_too_long", prompt_field, f"at most {max_prompt_len} "
                              "prompt tokens", f"{len(p)} tokens"))
    elif longest > max_len:
      ld.ledger.bad(i, BadRow("too_long", resp_field, f"prompt + response + eos within "
                              f"max_len={max_len} tokens", f"{longest} tokens"))
    else:
      used.append(i), rows_out.append(seqs)
  report = ld.finish(used, resp_field, "moved it to the start of each response")
  if from_data:
    k_max = max([len(seqs) for seqs in rows_out] + [2])
  n = len(rows_out)
  ids = np.full((n, k_max, max_len), ld.enc.pad_id, np.int32)
  mask = np.zeros((n, k_max, max_len), np.int32)
  last = np.zeros((n, k_max), np.int32)
  ranks = np.full((n, k_max), k_max, np.int32)
  valid = np.zeros((n, k_max), bool)
  for b, (i, seqs) in enumerate(zip(used, rows_out)):
    for k, seq in enumerate(seqs):
      ids[b, k, :len(seq)] = seq
      mask[b, k, :len(seq)] = 1
      last[b, k] = len(seq) - 1
    ranks[b, :len(seqs)] = parsed[i][1]
    valid[b, :len(seqs)] = True
  return TokenArrays(dict(input_ids=ids, attention_mask=mask, last_index=last, ranks=ranks,
                          valid=valid), report, row_ids=np.asarray(used, np.int64),
                     format=_format(chat))


def _ranked(row: Any, col: dict, k_max: int, read) -> tuple[list, list]:
  """(response texts, dense ranks) of a ranked comparison row; `BadRow` if unusable."""
  responses = get_list(row, col["responses"])
  ranks = get_ranks(row, col["ranks"])
  if len(ranks) != len(responses):
    raise BadRow("length_mismatch", col["ranks"], f"one rank per response "
                 f"({len(responses)})", f"{len(ranks)} ranks")
  if len(responses) < 2:
    raise BadRow("too_few_responses", col["responses"], "at least 2 responses",
                 f"{len(responses)}")
  if len(responses) > k_max:
    raise BadRow("too_many_responses", col["responses"], f"at most k_max={k_max} "
                 "responses", f"{len(responses)}")
  if len(set(ranks)) == 1:
    raise BadRow("all_tied", col["ranks"], "ranks that are not all equal", ranks)
  texts = [read(r, f"{col['responses']}[{j}]") for j, r in enumerate(responses)]
  levels = {r: n for n, r in enumerate(sorted(set(ranks)))}
  return texts, [levels[r] for r in ranks]


def load_prompts(spec: DataSpec, tokenizer: Any, max_prompt_len: int,
                 add_bos: Optional[bool] = None) -> TokenArrays:
  """Prompts for PPO rollouts and evaluation, LEFT padded (see module docstring).

  A plain prompt's trailing whitespace is dropped: the reply is sampled right after the
  prompt, and a tokenizer that attaches spaces to the next word would otherwise see a lone
  space token that SFT never showed it (`load_sft` moved that space into the completion).

  Returns:
    `TokenArrays` with input_ids, attention_mask: int32 [N, max_prompt_len]; `.texts`;
    `.format`.
  """
  max_prompt_len = _positive("max_prompt_len", max_prompt_len)
  ld = _Load(spec, tokenizer, add_bos)
  chat = ld.chat_mode("prompt")
  field = spec.column("messages") if chat else spec.column("prompt")

  def parse(row):
    if not chat:
      return ld.move_space(get_text(row, field), [])
    msgs = get_messages(row, field, final_assistant=False)
    if msgs[-1]["role"] == "assistant":
      msgs = msgs[:-1]
    if not msgs:
      raise BadRow("empty", field, "at least one message before an assistant turn", [])
    return [ld.enc.render_chat(msgs, field)]

  parsed = ld.parse(parse)
  encoded = ld.encode(parsed, [field])
  used, seqs = [], []
  for i, (p,) in encoded.items():
    p = ld.enc.with_bos(p)
    if len(p) > max_prompt_len:
      ld.ledger.bad(i, BadRow("prompt_too_long", field, f"at most {max_prompt_len} prompt "
                              "tokens", f"{len(p)} tokens"))
    else:
      used.append(i), seqs.append(p)
  report = ld.finish(used, field, "dropped it (the reply is sampled right after the prompt)")
  ids = np.full((len(seqs), max_prompt_len), ld.enc.pad_id, np.int32)
  mask = np.zeros((len(seqs), max_prompt_len), np.int32)
  for n, seq in enumerate(seqs):
    if seq:
      ids[n, -len(seq):] = seq
      mask[n, -len(seq):] = 1
  return TokenArrays(dict(input_ids=ids, attention_mask=mask), report,
                     texts=[parsed[i][0] for i in used], row_ids=np.asarray(used, np.int64),
                     format=_format(chat))


def load_text(spec: DataSpec, tokenizer: Any, seq_len: int, pack: bool = True,
              add_bos: Optional[bool] = None) -> TokenArrays:
  """Plain text for pretraining / PPO-ptx (see module docstring).

  Returns:
    `TokenArrays` with input_ids, attention_mask, loss_mask: int32 [N, seq_len]. With
    pack=True, N = ceil(total tokens / seq_len) and `report.n_used` counts documents.
  """
  seq_len = _positive("seq_len", seq_len)
  ld = _Load(spec, tokenizer, add_bos)
  field = spec.column("text")
  encoded = ld.encode(ld.parse(lambda row: [get_text(row, field)]), [field])
  used, docs = [], []
  for i, (ids,) in encoded.items():
    doc = ld.enc.with_bos(ids) + [ld.enc.eos_id]
    if not pack and len(doc) > seq_len:
      ld.ledger.bad(i, BadRow("too_long", field, f"text + eos within seq_len={seq_len} "
                              "tokens (or pack=True)", f"{len(doc)} tokens"))
    else:
      used.append(i), docs.append(doc)
  report = ld.finish(used, field)
  if pack:
    flat = np.fromiter((t for doc in docs for t in doc), np.int32)
    n = -(-len(flat) // seq_len)
    ids = np.full((n * seq_len,), ld.enc.pad_id, np.int32)
    mask = np.zeros((n * seq_len,), np.int32)
    ids[:len(flat)], mask[:len(flat)] = flat, 1
    ids, mask, row_ids = ids.reshape(n, seq_len), mask.reshape(n, seq_len), None
  else:
    ids, mask = _pad_right(docs, seq_len, ld.enc.pad_id)
    row_ids = np.asarray(used, np.int64)
  return TokenArrays(dict(input_ids=ids, attention_mask=mask, loss_mask=mask.copy()),
                     report, row_ids=row_ids)
