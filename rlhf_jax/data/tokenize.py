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
      [N, k_max] int32, valid [N, k_max] bool, prompt_len [N] int32 (bos + prompt tokens:
      each response starts at this index; DPO's log-probs sum from there). Padding slots:
      pad ids, mask 0, last_index 0, rank k_max, valid False.
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

Each loader has two halves, so that `cache` can run the first on one shard of the rows per
process and the second on the rows of each batch: ``*_examples`` reads, checks and tokenizes
rows into `Examples` (token lists, unpadded), and `layout` pads any subset of them into the
arrays above. ``finish`` merges the bad-row reports of the parts and raises or logs once.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import numpy as np

from rlhf_jax.data.sources import DataSpec, Source, open_source
from rlhf_jax.data.validate import (BadRow, DataError, DataReport, RowLedger, check_text,
                                    get_finished, get_list, get_messages,
                                    get_prompt_messages, get_ranks, get_response, get_text,
                                    get_value)
from rlhf_jax.data.vocab import Encoder

log = logging.getLogger("rlhf_jax")
TRAILING_SPACE = "prompt_trailing_whitespace"  # the `DataReport.notes` key
KINDS = ("sft", "comparisons", "prompts", "text")


@dataclasses.dataclass
class TokenArrays:
  """A loaded dataset.

  Attributes:
    arrays: name -> numpy array, all with the same leading dimension N (or, from
      `cache.load_cached`, columns that read their rows from the on-disk cache).
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
  texts: Optional[Sequence] = None
  row_ids: Optional[np.ndarray] = None
  format: str = "plain"

  @property
  def is_chat(self) -> bool:
    return self.format == "chat"

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))


@dataclasses.dataclass
class Examples:
  """The usable rows of one load (or of one shard of it), tokenized but not padded.

  Attributes:
    row_ids: the source row of each example, increasing.
    seqs: per example, its token sequences (K responses for comparisons, else one).
    levels: per example, an int per sequence: the dense rank (comparisons), else 0.
    extra: per example, the prompt length incl. bos (sft, comparisons), else 0.
    texts: per example, the prompt string (prompts), else None.
    chat: rows were chat messages.
    report: bad rows of these rows, not raised yet (`finish` does).
    field: the column `DataReport.raise_if_empty` names.
    moved_text: what happened to a prompt's trailing whitespace (the log line).
  """
  row_ids: list
  seqs: list
  levels: list
  extra: list
  texts: Optional[list]
  chat: bool
  report: DataReport
  field: str
  moved_text: str

  @property
  def k(self) -> int:
    """The most sequences an example has (K of the data, for comparisons)."""
    return max([len(s) for s in self.seqs] + [0])


class Load:
  """Shared state of one load: rows, encoder, bad-row ledger.

  `source` / `keys` (a sharded load): the rows of this shard and the column names of the
  whole dataset, so every shard reads the rows in the same (chat / ranked) mode.
  """

  def __init__(self, spec: DataSpec, tokenizer: Any, add_bos: Optional[bool],
               source: Optional[Source] = None, keys: Optional[set] = None):
    if not isinstance(spec, DataSpec):
      raise DataError(f"expected a data.DataSpec, got {type(spec).__name__}")
    self.spec = spec
    self.enc = Encoder(tokenizer, add_bos, spec.path)
    self.source = source if source is not None else open_source(spec)
    self.keys = keys
    self.ledger = RowLedger(spec.path, spec.on_bad_row, self.source.locate)
    self.moved: set = set()  # rows whose prompt's trailing whitespace was moved
    self.index = -1          # the row `parse` is reading

  def columns(self) -> set:
    return self.keys if self.keys is not None else self.source.columns()

  def chat_mode(self, primary: str) -> bool:
    """Whether rows are read as `messages` instead of `primary` text."""
    cols = self.spec.columns
    if primary in cols or "messages" in cols:
      use = "messages" in cols and primary not in cols
    else:
      keys = self.columns()
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
    for i, row in self.source.numbered():
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

  def examples(self, used: list, seqs: list, field: str, chat: bool = False,
               levels: Optional[list] = None, extra: Optional[list] = None,
               texts: Optional[list] = None,
               moved: str = "moved it to the start of the completion") -> Examples:
    report = self.ledger.report(len(self.source.rows), len(used))
    count = len(self.moved.intersection(used))
    if count:
      report.notes[TRAILING_SPACE] = count
    return Examples(row_ids=list(used), seqs=seqs,
                    levels=levels or [[0] * len(s) for s in seqs],
                    extra=extra or [0] * len(used), texts=texts, chat=chat, report=report,
                    field=field, moved_text=moved)


def finish(spec: DataSpec, reports: Sequence[DataReport], field: str, moved_text: str,
           log_notes: bool = True) -> DataReport:
  """The report of a load whose rows were tokenized in parts (one part: a whole load).

  Raises, as one load does: the first bad row's `DataError` with ``on_bad_row="error"``,
  then `DataError` naming `field` when no row is usable. Logs the moved-whitespace note
  (`moved_text`: what was done) when `log_notes` (one process of several).
  """
  report = DataReport.merge(spec.path, reports)
  if spec.on_bad_row == "error":
    report.raise_first_bad()
  report.raise_if_empty(field)
  count = report.notes.get(TRAILING_SPACE, 0)
  if count and log_notes:
    log.warning("%s: %d of %d prompts ended in whitespace; %s, so that token ids match "
                "the tokenization of the joint text", spec.path, count, report.n_used,
                moved_text)
  return report


def _positive(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f"{name}={value!r}: expected an int >= {minimum}")
  return int(value)


def _pad_right(seqs: list, length: int, pad: int) -> tuple:
  ids = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for n, seq in enumerate(seqs):
    ids[n, :len(seq)] = seq
    mask[n, :len(seq)] = 1
  return ids, mask


def format_name(chat: bool) -> str:
  return "chat" if chat else "plain"


# ---- layout: examples -> padded arrays ----------------------------------------------------

def layout(kind: str, params: dict, pad_id: int, seqs: list, levels: list,
           extra: list) -> dict:
  """The padded arrays of some examples (module docstring), for any subset of a load.

  Args:
    kind: one of `KINDS` ("text" here is pack=False; packed text is `pack_text`).
    params: sft {max_len}, comparisons {max_len, k_max}, prompts {max_prompt_len},
      text {seq_len}.
    seqs / levels / extra: the examples' fields (`Examples`).
  """
  if kind == "sft":
    ids, mask = _pad_right([s[0] for s in seqs], params["max_len"], pad_id)
    loss_mask = mask.copy()
    for n, plen in enumerate(extra):
      loss_mask[n, :plen] = 0
    return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)
  if kind == "comparisons":
    n, k_max, max_len = len(seqs), params["k_max"], params["max_len"]
    ids = np.full((n, k_max, max_len), pad_id, np.int32)
    mask = np.zeros((n, k_max, max_len), np.int32)
    last = np.zeros((n, k_max), np.int32)
    ranks = np.full((n, k_max), k_max, np.int32)
    valid = np.zeros((n, k_max), bool)
    for b, (row, row_levels) in enumerate(zip(seqs, levels)):
      for k, seq in enumerate(row):
        ids[b, k, :len(seq)] = seq
        mask[b, k, :len(seq)] = 1
        last[b, k] = len(seq) - 1
      ranks[b, :len(row)] = row_levels
      valid[b, :len(row)] = True
    return dict(input_ids=ids, attention_mask=mask, last_index=last, ranks=ranks,
                valid=valid, prompt_len=np.asarray(extra, np.int32).reshape(n))
  if kind == "prompts":
    ids = np.full((len(seqs), params["max_prompt_len"]), pad_id, np.int32)
    mask = np.zeros(ids.shape, np.int32)
    for n, (seq,) in enumerate(seqs):
      if len(seq):
        ids[n, -len(seq):] = seq
        mask[n, -len(seq):] = 1
    return dict(input_ids=ids, attention_mask=mask)
  if kind == "text":
    ids, mask = _pad_right([s[0] for s in seqs], params["seq_len"], pad_id)
    return dict(input_ids=ids, attention_mask=mask, loss_mask=mask.copy())
  raise ValueError(f"layout: kind={kind!r}: expected one of {KINDS}")


def pack_text(flat: np.ndarray, seq_len: int, pad_id: int) -> dict:
  """Packed text: the token stream `flat` cut into [ceil(len / seq_len), seq_len] rows."""
  n = -(-len(flat) // seq_len)
  ids = np.full((n * seq_len,), pad_id, np.int32)
  mask = np.zeros((n * seq_len,), np.int32)
  ids[:len(flat)], mask[:len(flat)] = flat, 1
  ids, mask = ids.reshape(n, seq_len), mask.reshape(n, seq_len)
  return dict(input_ids=ids, attention_mask=mask, loss_mask=mask.copy())


# ---- examples: rows -> checked token lists -------------------------------------------------

def sft_examples(ld: Load, max_prompt_len: int, max_len: int) -> Examples:
  """`load_sft`'s rows (see its docstring) as `Examples` (extra = prompt length)."""
  spec = ld.spec
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
      used.append(i), seqs.append([seq]), prompt_lens.append(len(p))
  return ld.examples(used, seqs, fields[1], chat, extra=prompt_lens)


def comparison_examples(ld: Load, max_prompt_len: int, max_len: int, k_max: int,
                        stop_ids: Optional[Sequence[int]] = None) -> Examples:
  """`load_comparisons`' rows as `Examples` (levels = dense ranks, extra = prompt length).

  `k_max` 0 takes any number of responses (K is fixed later from all parts).
  """
  spec = ld.spec
  chat = ld.chat_mode("prompt")
  tail = ld.enc.tail(chat, stop_ids)
  col = {r: spec.column(r) for r in ("prompt", "messages", "chosen", "rejected", "responses",
                                     "ranks", "finished")}
  if any(r in spec.columns for r in ("responses", "ranks")):
    ranked = True
  elif any(r in spec.columns for r in ("chosen", "rejected")):
    ranked = False
  else:
    keys = ld.columns()
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
  used, rows_out, prompt_lens = [], [], []
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
      used.append(i), rows_out.append(seqs), prompt_lens.append(len(p))
  return ld.examples(used, rows_out, resp_field, chat, levels=[parsed[i][1] for i in used],
                     extra=prompt_lens, moved="moved it to the start of each response")


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


def prompt_examples(ld: Load, max_prompt_len: int) -> Examples:
  """`load_prompts`' rows as `Examples` (texts = the prompts as tokenized)."""
  spec = ld.spec
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
      used.append(i), seqs.append([p])
  return ld.examples(used, seqs, field, chat, texts=[parsed[i][0] for i in used],
                     moved="dropped it (the reply is sampled right after the prompt)")


def text_examples(ld: Load, seq_len: int, pack: bool) -> Examples:
  """`load_text`'s documents ([bos] + text + eos) as `Examples`."""
  field = ld.spec.column("text")
  encoded = ld.encode(ld.parse(lambda row: [get_text(row, field)]), [field])
  used, docs = [], []
  for i, (ids,) in encoded.items():
    doc = ld.enc.with_bos(ids) + [ld.enc.eos_id]
    if not pack and len(doc) > seq_len:
      ld.ledger.bad(i, BadRow("too_long", field, f"text + eos within seq_len={seq_len} "
                              "tokens (or pack=True)", f"{len(doc)} tokens"))
    else:
      used.append(i), docs.append([doc])
  return ld.examples(used, docs, field)


def check_params(kind: str, params: dict) -> dict:
  """`params` of a loader with its ints checked (the `DataError`s the loaders raise)."""
  out = dict(params)
  for name in ("max_prompt_len", "max_len", "seq_len"):
    if name in out:
      out[name] = _positive(name, out[name])
  if "k_max" in out:   # 0: K from the data
    out["k_max"] = 0 if out["k_max"] == 0 else _positive("k_max", out["k_max"], 2)
  return out


def tokenize_rows(kind: str, ld: Load, params: dict) -> Examples:
  """The ``*_examples`` function of `kind`, with `check_params`' params."""
  if kind == "sft":
    return sft_examples(ld, params["max_prompt_len"], params["max_len"])
  if kind == "comparisons":
    return comparison_examples(ld, params["max_prompt_len"], params["max_len"],
                               params["k_max"], params.get("stop_ids"))
  if kind == "prompts":
    return prompt_examples(ld, params["max_prompt_len"])
  if kind == "text":
    return text_examples(ld, params["seq_len"], params["pack"])
  raise ValueError(f"tokenize_rows: kind={kind!r}: expected one of {KINDS}")


def load_kind(kind: str, spec: DataSpec, tokenizer: Any, params: dict,
              add_bos: Optional[bool] = None) -> TokenArrays:
  """The loader of `kind` (`KINDS`) with its params as a dict (`cache.load_cached`'s).

  A whole load in this process: tokenize every row, check, lay out all of them.
  """
  params = check_params(kind, params)
  ld = Load(spec, tokenizer, add_bos)
  ex = tokenize_rows(kind, ld, params)
  report = finish(spec, [ex.report], ex.field, ex.moved_text)
  row_ids = np.asarray(ex.row_ids, np.int64)
  if kind == "text" and params["pack"]:
    flat = np.fromiter((t for (doc,) in ex.seqs for t in doc), np.int32)
    return TokenArrays(pack_text(flat, params["seq_len"], ld.enc.pad_id), report)
  if kind == "comparisons" and params["k_max"] == 0:
    params["k_max"] = max(ex.k, 2)
  arrays = layout(kind, params, ld.enc.pad_id, ex.seqs, ex.levels, ex.extra)
  return TokenArrays(arrays, report, texts=ex.texts, row_ids=row_ids,
                     format=format_name(ex.chat) if kind != "text" else "plain")


# ---- the loaders ----------------------------------------------------------------------------

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
  return load_kind("sft", spec, tokenizer,
                   dict(max_prompt_len=max_prompt_len, max_len=max_len), add_bos)


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
    ranks [N, k_max] int32, valid [N, k_max] bool and prompt_len [N] int32; `.format`.
  """
  return load_kind("comparisons", spec, tokenizer,
                   dict(max_prompt_len=max_prompt_len, max_len=max_len, k_max=k_max,
                        stop_ids=stop_ids), add_bos)


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
  return load_kind("prompts", spec, tokenizer, dict(max_prompt_len=max_prompt_len), add_bos)


def load_text(spec: DataSpec, tokenizer: Any, seq_len: int, pack: bool = True,
              add_bos: Optional[bool] = None) -> TokenArrays:
  """Plain text for pretraining / PPO-ptx (see module docstring).

  Returns:
    `TokenArrays` with input_ids, attention_mask, loss_mask: int32 [N, seq_len]. With
    pack=True, N = ceil(total tokens / seq_len) and `report.n_used` counts documents.
  """
  return load_kind("text", spec, tokenizer, dict(seq_len=seq_len, pack=bool(pack)), add_bos)
