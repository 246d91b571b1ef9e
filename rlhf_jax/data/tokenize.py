"""Rows -> static-shape int32 token arrays, one loader per dataset format.

Each loader opens `spec` (see `sources`), checks every row (see `validate` for the bad-row
reasons), tokenizes with ``add_special_tokens=False`` plus the BOS policy of `vocab`, and
returns a `TokenArrays`. Nothing is truncated: a row that does not fit is a bad row. Prompt
and response are tokenized separately and concatenated, so the prompt/response boundary is
exact (and the same one the PPO sampler sees).

  load_sft(spec, tok, max_prompt_len, max_len)
      rows: prompt + completion, or chat ``messages`` (needs ``tokenizer.chat_template``:
      prompt = template of all messages but the last, with the generation prompt;
      completion = the last, assistant, message's content).
      input_ids / attention_mask / loss_mask [N, max_len], right padded;
      sequence = [bos] + prompt + completion + eos; loss_mask = 1 on completion + eos.
  load_comparisons(spec, tok, max_prompt_len, max_len, k_max)
      rows: prompt + chosen + rejected (K = 2, ranks [0, 1]), or prompt + ``responses``
      (list) + ``ranks`` (ints, lower = better, ties allowed). Ranks are made dense
      from 0 (ranks [3, 1, 1] -> [1, 0, 0]).
      input_ids / attention_mask [N, k_max, max_len] (sequence = [bos] + prompt + response
      + eos, right padded), last_index [N, k_max] (the eos position), ranks [N, k_max]
      int32, valid [N, k_max] bool. Padding slots: pad ids, mask 0, last_index 0,
      rank k_max, valid False.
  load_prompts(spec, tok, max_prompt_len)
      rows: prompt, or ``messages`` (a trailing assistant turn is dropped; rendered with the
      generation prompt). input_ids / attention_mask [N, max_prompt_len], LEFT padded;
      `.texts` holds the prompt strings (rendered template for chats).
  load_text(spec, tok, seq_len, pack=True)
      rows: text. Documents are [bos] + text + eos. pack=True: concatenated in row order and
      cut into [N, seq_len] chunks (the last one right padded; attention crosses document
      boundaries, as in GPT pretraining); pack=False: one document per row, right padded,
      longer ones are bad rows. input_ids / attention_mask / loss_mask (= attention_mask).

All loaders take ``add_bos: bool | None = None`` (see `vocab`). Which columns hold which
role is `DataSpec.columns`; with no explicit choice, a dataset is read as chat ``messages``
when it has a messages column and no prompt column, and as ranked comparisons when it has a
responses column and no chosen column.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from rlhf_jax.data.sources import DataSpec, open_source
from rlhf_jax.data.validate import (BadRow, DataError, DataReport, RowLedger, get_list,
                                    get_messages, get_ranks, get_text, check_text)
from rlhf_jax.data.vocab import Encoder


@dataclasses.dataclass
class TokenArrays:
  """A loaded dataset.

  Attributes:
    arrays: name -> numpy array, all with the same leading dimension N.
    report: the `DataReport` (rows read, used, skipped by reason).
    texts: prompt strings (`load_prompts` only), aligned with the arrays.
    row_ids: [N] source row index of each example (None for packed text).
  """
  arrays: dict
  report: DataReport
  texts: Optional[list] = None
  row_ids: Optional[np.ndarray] = None

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
      try:
        parsed[i] = fn(row)
      except BadRow as e:
        self.ledger.bad(i, e)
    return parsed

  def finish(self, used: list, field: str) -> DataReport:
    report = self.ledger.finish(len(self.source.rows), len(used))
    report.raise_if_empty(field)
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
    `TokenArrays` with input_ids, attention_mask, loss_mask: int32 [N, max_len].

  Raises:
    DataError: on a bad row with ``on_bad_row="error"``, or when no row is usable.
  """
  max_prompt_len, max_len = _positive("max_prompt_len", max_prompt_len), \
      _positive("max_len", max_len)
  ld = _Load(spec, tokenizer, add_bos)
  chat = ld.chat_mode("prompt")
  col_p, col_c, col_m = (spec.column(r) for r in ("prompt", "completion", "messages"))

  def parse(row):
    if chat:
      msgs = get_messages(row, col_m, final_assistant=True)
      return [ld.enc.render_chat(msgs[:-1], col_m), msgs[-1]["content"]]
    return [get_text(row, col_p), get_text(row, col_c)]

  fields = [col_m, col_m] if chat else [col_p, col_c]
  encoded = ld.encode(ld.parse(parse), fields)
  used, seqs, prompt_lens = [], [], []
  for i, (p, c) in encoded.items():
    p = ld.enc.with_bos(p)
    seq = p + c + [ld.enc.eos_id]
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
                     row_ids=np.asarray(used, np.int64))


def load_comparisons(spec: DataSpec, tokenizer: Any, max_prompt_len: int, max_len: int,
                     k_max: int, add_bos: Optional[bool] = None) -> TokenArrays:
  """Ranked responses for the reward model (see module docstring).

  Args:
    spec: the dataset.
    tokenizer: a `transformers` tokenizer with pad and eos tokens.
    max_prompt_len: longest prompt in tokens (incl. bos).
    max_len: sequence length T of each prompt + response + eos.
    k_max: the K dimension; rows with more responses are bad rows.
    add_bos: BOS policy (see `vocab`).

  Returns:
    `TokenArrays` with input_ids, attention_mask [N, k_max, max_len] int32, last_index,
    ranks [N, k_max] int32 and valid [N, k_max] bool.
  """
  max_prompt_len, max_len = _positive("max_prompt_len", max_prompt_len), \
      _positive("max_len", max_len)
  k_max = _positive("k_max", k_max, 2)
  ld = _Load(spec, tokenizer, add_bos)
  col = {r: spec.column(r) for r in ("prompt", "chosen", "rejected", "responses", "ranks")}
  if any(r in spec.columns for r in ("responses", "ranks")):
    ranked = True
  elif any(r in spec.columns for r in ("chosen", "rejected")):
    ranked = False
  else:
    keys = ld.source.columns()
    ranked = col["chosen"] not in keys and col["responses"] in keys

  def parse(row):
    prompt = get_text(row, col["prompt"])
    if not ranked:
      return [prompt, get_text(row, col["chosen"]), get_text(row, col["rejected"])], [0, 1]
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
    texts = [check_text(r, f"{col['responses']}[{j}]") for j, r in enumerate(responses)]
    levels = {r: n for n, r in enumerate(sorted(set(ranks)))}
    return [prompt] + texts, [levels[r] for r in ranks]

  parsed = ld.parse(parse)
  rank_of = {i: v[1] for i, v in parsed.items()}
  resp_field = col["responses"] if ranked else col["chosen"]
  encoded = ld.encode({i: v[0] for i, v in parsed.items()}, [col["prompt"], resp_field])
  used, rows = [], []
  for i, (p, *responses) in encoded.items():
    p = ld.enc.with_bos(p)
    seqs = [p + r + [ld.enc.eos_id] for r in responses]
    longest = max(len(s) for s in seqs)
    if len(p) > max_prompt_len:
      ld.ledger.bad(i, BadRow("prompt_too_long", col["prompt"], f"at most {max_prompt_len} "
                              "prompt tokens", f"{len(p)} tokens"))
    elif longest > max_len:
      ld.ledger.bad(i, BadRow("too_long", resp_field, f"prompt + response + eos within "
                              f"max_len={max_len} tokens", f"{longest} tokens"))
    else:
      used.append(i), rows.append(seqs)
  report = ld.finish(used, resp_field)
  n = len(rows)
  ids = np.full((n, k_max, max_len), ld.enc.pad_id, np.int32)
  mask = np.zeros((n, k_max, max_len), np.int32)
  last = np.zeros((n, k_max), np.int32)
  ranks = np.full((n, k_max), k_max, np.int32)
  valid = np.zeros((n, k_max), bool)
  for b, (i, seqs) in enumerate(zip(used, rows)):
    for k, seq in enumerate(seqs):
      ids[b, k, :len(seq)] = seq
      mask[b, k, :len(seq)] = 1
      last[b, k] = len(seq) - 1
    ranks[b, :len(seqs)] = rank_of[i]
    valid[b, :len(seqs)] = True
  return TokenArrays(dict(input_ids=ids, attention_mask=mask, last_index=last, ranks=ranks,
                          valid=valid), report, row_ids=np.asarray(used, np.int64))


def load_prompts(spec: DataSpec, tokenizer: Any, max_prompt_len: int,
                 add_bos: Optional[bool] = None) -> TokenArrays:
  """Prompts for PPO rollouts and evaluation, LEFT padded (see module docstring).

  Returns:
    `TokenArrays` with input_ids, attention_mask: int32 [N, max_prompt_len]; `.texts`.
  """
  max_prompt_len = _positive("max_prompt_len", max_prompt_len)
  ld = _Load(spec, tokenizer, add_bos)
  chat = ld.chat_mode("prompt")
  field = spec.column("messages") if chat else spec.column("prompt")

  def parse(row):
    if not chat:
      return [get_text(row, field)]
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
  report = ld.finish(used, field)
  ids = np.full((len(seqs), max_prompt_len), ld.enc.pad_id, np.int32)
  mask = np.zeros((len(seqs), max_prompt_len), np.int32)
  for n, seq in enumerate(seqs):
    if seq:
      ids[n, -len(seq):] = seq
      mask[n, -len(seq):] = 1
  return TokenArrays(dict(input_ids=ids, attention_mask=mask), report,
                     texts=[parsed[i][0] for i in used], row_ids=np.asarray(used, np.int64))


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
