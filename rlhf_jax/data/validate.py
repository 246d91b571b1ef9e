"""Bad-row accounting: typed field access, `DataError`, and the `DataReport`.

Every loader reads rows through the helpers here. A helper that finds a value it cannot use
raises `BadRow(reason, field, expected, got)`; the loader hands it to `RowLedger.bad`, which
counts it (``on_bad_row="skip"``) or, once all rows are seen, raises a `DataError` for the
FIRST bad row (``on_bad_row="error"``) naming the file, row, field and what was expected.

Reasons (stable strings, the keys of `DataReport.skipped`):

  ``not_an_object``     the row is not a JSON object / mapping.
  ``malformed_json``    a JSON-lines line that does not parse.
  ``missing_field``     the column is absent or null.
  ``wrong_type``        e.g. a number where text was expected, ranks that are not ints,
                        messages that are not a list of {role, content}.
  ``empty``             empty (or whitespace-only) prompt / response / text.
  ``length_mismatch``   ``len(ranks) != len(responses)``.
  ``too_few_responses`` fewer than 2 responses in a comparison row.
  ``too_many_responses`` more than ``k_max`` responses.
  ``all_tied``          every rank equal: the row holds no preference.
  ``prompt_too_long``   prompt tokens > ``max_prompt_len``.
  ``too_long``          prompt + response + eos > ``max_len`` (rows are never truncated).
  ``template_error``    the tokenizer's chat template failed on the messages.
  ``tokenizer_error``   the tokenizer failed on the text.

Notes (`DataReport.notes`) count rows that were used but changed on the way, e.g.
``prompt_trailing_whitespace``: prompts whose trailing whitespace was moved to the start of
the completion / responses (or dropped, for PPO prompts); see `tokenize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from rlhf_jax.errors import UserError

N_EXAMPLES = 5  # row indices kept per reason in `DataReport.examples`


class DataError(UserError):
  """A dataset problem the user can fix; the message names file, row and field.

  Subclasses `ValueError` (through `rlhf_jax.errors.UserError`), so `launch/train.py`
  prints it without a traceback.
  """


class Malformed:
  """Placeholder row for a JSON-lines line that does not parse."""

  def __init__(self, error: str):
    self.error = error

  def __repr__(self):
    return f"<malformed JSON: {self.error}>"


class BadRow(Exception):
  """Internal signal: one row cannot be used (see module docstring for reasons)."""

  def __init__(self, reason: str, field: str, expected: str, got: Any = None,
               has_got: bool = True):
    super().__init__(reason)
    self.reason, self.field, self.expected = reason, field, expected
    self.got, self.has_got = got, has_got

  def describe(self) -> str:
    got = f"; got {short_repr(self.got)}" if self.has_got else ""
    return f"field {self.field!r}: expected {self.expected}{got} [{self.reason}]"


def short_repr(value: Any, limit: int = 80) -> str:
  """`repr` of a value, cut to `limit` characters (rows can hold megabytes of junk)."""
  if isinstance(value, str) and len(value) > limit:
    return repr(value[:limit]) + f"... ({len(value)} chars)"
  try:
    text = repr(value)
  except Exception:  # a hostile __repr__ must not hide the real error
    text = f"<{type(value).__name__}>"
  return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass
class DataReport:
  """What a loader did with a dataset.

  Attributes:
    file: the dataset (file, directory or hub name) as given in `DataSpec.path`.
    n_rows: rows read (after `max_rows`).
    n_used: rows that became examples.
    skipped: reason -> number of rows skipped for it.
    examples: reason -> the first few (0-based) row indices skipped for it.
    messages: reason -> the full description of the first row skipped for it.
    notes: what -> number of used rows changed in that way (see module docstring).
  """
  file: str
  n_rows: int = 0
  n_used: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)
  examples: dict = dataclasses.field(default_factory=dict)
  messages: dict = dataclasses.field(default_factory=dict)
  notes: dict = dataclasses.field(default_factory=dict)

  @property
  def n_skipped(self) -> int:
    return int(sum(self.skipped.values()))

  def __str__(self) -> str:
    text = f"{self.file}: {self.n_rows} rows read, {self.n_used} used"
    if self.notes:
      text += " (" + ", ".join(f"{what}: {n}" for what, n in sorted(self.notes.items())) + ")"
    if not self.skipped:
      return text + ", none skipped."
    parts = []
    for reason in sorted(self.skipped, key=lambda r: -self.skipped[r]):
      rows = ", ".join(str(i) for i in self.examples.get(reason, []))
      more = ", ..." if self.skipped[reason] > len(self.examples.get(reason, [])) else ""
      parts.append(f"{reason}: {self.skipped[reason]} (rows {rows}{more}; first: "
                   f"{self.messages.get(reason, '')})")
    return text + f", {self.n_skipped} skipped — " + "; ".join(parts) + "."

  @classmethod
  def merge(cls, file: str, reports) -> "DataReport":
    """One report for rows split over several loads (the parts of a sharded load).

    Counts add up; per reason, the examples are the smallest row indices of all parts and
    the message is the one of the smallest, so the result equals a single load's report.
    """
    out = cls(file=file)
    firsts: dict = {}
    for r in reports:
      out.n_rows += r.n_rows
      out.n_used += r.n_used
      for reason, n in r.skipped.items():
        out.skipped[reason] = out.skipped.get(reason, 0) + n
        rows = r.examples.get(reason, [])
        out.examples[reason] = sorted(out.examples.get(reason, []) + list(rows))[:N_EXAMPLES]
        if rows and (reason not in firsts or rows[0] < firsts[reason]):
          firsts[reason] = rows[0]
          out.messages[reason] = r.messages[reason]
      for what, n in r.notes.items():
        out.notes[what] = out.notes.get(what, 0) + n
    # Reasons in the order of their first row, as one load meets them (`__str__` lists
    # equal counts in this order).
    out.skipped = {r: out.skipped[r] for r in sorted(out.skipped, key=firsts.__getitem__)}
    return out

  def raise_first_bad(self) -> None:
    """Raises `DataError` naming the first bad row (file, row, field), if any was skipped."""
    if not self.skipped:
      return
    reason = min((rows[0], reason) for reason, rows in self.examples.items() if rows)[1]
    raise DataError(f"{self.file}: {self.messages[reason]}. (Set on_bad_row='skip' to skip "
                    f"such rows; {self.n_skipped} bad of {self.n_rows}.)")

  def raise_if_empty(self, field: str) -> None:
    """Raises `DataError` naming the file and `field` when no row was usable."""
    if self.n_used > 0:
      return
    if self.n_rows == 0:
      raise DataError(f"{self.file}: the dataset has no rows, so there is no usable "
                      f"{field!r}; check the path, split and max_rows.")
    raise DataError(f"{self.file}: none of the {self.n_rows} rows has a usable {field!r}. "
                    f"{self}")


class RowLedger:
  """Collects bad rows of one load; `finish` raises (mode "error") or fills the report."""

  def __init__(self, file: str, on_bad_row: str, locate: Callable[[int], str]):
    self.file, self.on_bad_row, self.locate = file, on_bad_row, locate
    self.bad_rows: dict[int, BadRow] = {}

  def bad(self, index: int, err: BadRow) -> None:
    self.bad_rows.setdefault(index, err)

  def is_bad(self, index: int) -> bool:
    return index in self.bad_rows

  def finish(self, n_rows: int, n_used: int) -> DataReport:
    """The report; raises the first bad row's `DataError` with ``on_bad_row="error"``."""
    report = self.report(n_rows, n_used)
    if self.on_bad_row == "error":
      report.raise_first_bad()
    return report

  def report(self, n_rows: int, n_used: int) -> DataReport:
    """The report, never raising (a sharded load raises once all parts are merged)."""
    report = DataReport(file=self.file, n_rows=n_rows, n_used=n_used)
    for index in sorted(self.bad_rows):
      err = self.bad_rows[index]
      report.skipped[err.reason] = report.skipped.get(err.reason, 0) + 1
      rows = report.examples.setdefault(err.reason, [])
      if len(rows) < N_EXAMPLES:
        rows.append(index)
      report.messages.setdefault(err.reason, f"{self.locate(index)}: {err.describe()}")
    return report


# ---- typed field access -------------------------------------------------------------------

def get_value(row: Any, column: str) -> Any:
  """`row[column]`; `BadRow` if the row is not a mapping or the value is absent / null."""
  if isinstance(row, Malformed):
    raise BadRow("malformed_json", "<row>", "a line of valid JSON", row)
  if not isinstance(row, dict):
    raise BadRow("not_an_object", "<row>", "a JSON object with named fields", row)
  value = row.get(column)
  if value is None:
    raise BadRow("missing_field", column, "a value (the column is absent or null)",
                 has_got=False)
  return value


def check_text(value: Any, field: str, allow_empty: bool = False) -> str:
  """`value` if it is a non-empty, UTF-8 encodable `str`; `BadRow` otherwise."""
  if not isinstance(value, str):
    raise BadRow("wrong_type", field, "a string", value)
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise BadRow("wrong_type", field, "valid Unicode text (it holds a lone surrogate)",
                 value) from None
  if not allow_empty and not value.strip():
    raise BadRow("empty", field, "non-empty text", value)
  return value


def get_text(row: Any, column: str, allow_empty: bool = False) -> str:
  return check_text(get_value(row, column), column, allow_empty)


def get_list(row: Any, column: str) -> list:
  value = get_value(row, column)
  if isinstance(value, np.ndarray):  # some dataset backends return arrays for lists
    value = value.tolist()
  if not isinstance(value, (list, tuple)):
    raise BadRow("wrong_type", column, "a list", value)
  return list(value)


def get_ranks(row: Any, column: str) -> list[int]:
  """A list of ints (bools and floats are rejected: a rank is an integer position)."""
  ranks = get_list(row, column)
  for r in ranks:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
      raise BadRow("wrong_type", column, "a list of integer ranks (lower = better)", ranks)
    if abs(int(r)) > 2**31 - 1:
      raise BadRow("wrong_type", column, "ranks that fit in int32", ranks)
  return [int(r) for r in ranks]


def get_messages(row: Any, column: str, final_assistant: Optional[bool]) -> list[dict]:
  """A chat: a non-empty list of {"role": str, "content": str}.

  Args:
    final_assistant: True: the last message must be an assistant turn with non-empty
      content and at least one message must precede it (SFT). False / None: any roles.
  """
  messages = get_list(row, column)
  if not messages:
    raise BadRow("empty", column, "a non-empty list of messages", messages)
  clean = []
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
        not isinstance(m.get("content"), str):
      raise BadRow("wrong_type", column, "a list of {'role': str, 'content': str}", m)
    check_text(m["role"], column + ".role")
    check_text(m["content"], column + ".content", allow_empty=True)
    clean.append({"role": m["role"], "content": m["content"]})
  if final_assistant:
    if clean[-1]["role"] != "assistant":
      raise BadRow("wrong_type", column, "the last message to have role 'assistant'",
                   clean[-1]["role"])
    if len(clean) < 2:
      raise BadRow("wrong_type", column, "at least one message before the final "
                   "assistant turn (the prompt)", messages)
    check_text(clean[-1]["content"], column + "[-1].content")
  return clean


def get_response(value: Any, field: str) -> str:
  """An assistant reply: a string, a {role: assistant, content} dict, or a list of one.

  Chat comparison rows may give each response as plain text or as the assistant message
  itself (as chat datasets store it); either way the content text is returned.
  """
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    if len(value) != 1:
      raise BadRow("wrong_type", field, "a string, an assistant message, or a list of one "
                   "assistant message", value)
    value = value[0]
  if isinstance(value, dict):
    if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
      raise BadRow("wrong_type", field, "{'role': 'assistant', 'content': str}", value)
    value = value["content"]
  return check_text(value, field)


def get_finished(row: Any, column: str, n: int) -> Optional[list[bool]]:
  """The optional per-response ``finished`` flags: None when absent / null, else n bools.

  A response with finished=False was cut off before its EOS (e.g. sampled up to the token
  limit); the loaders give it no EOS, as PPO scores such a response at its last token.
  """
  if not isinstance(row, dict) or row.get(column) is None:
    return None
  flags = get_list(row, column)
  for f in flags:
    if not isinstance(f, (bool, np.bool_)):
      raise BadRow("wrong_type", column, "a list of booleans (one per response)", flags)
  if len(flags) != n:
    raise BadRow("length_mismatch", column, f"one flag per response ({n})",
                 f"{len(flags)} flags")
  return [bool(f) for f in flags]


def get_prompt_messages(row: Any, column: str) -> list[dict]:
  """A chat prompt for comparisons: messages that do not end with an assistant turn."""
  msgs = get_messages(row, column, final_assistant=False)
  if msgs[-1]["role"] == "assistant":
    raise BadRow("wrong_type", column, "a prompt conversation ending with a user turn (the "
                 "responses are the assistant's reply)", msgs[-1]["role"])
  return msgs
