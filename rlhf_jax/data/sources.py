"""Opening a dataset: `DataSpec` -> a list of raw rows with their locations.

Where the rows come from (`DataSpec.path`):

  * a ``.jsonl`` file: one JSON object per line (blank lines ignored);
  * a ``.json`` file: a list of objects, an object holding one such list (e.g.
    ``{"data": [...]}``), or JSON lines;
  * a ``.parquet`` file;
  * a ``.csv`` file with a header row (every value is text: no list columns);
  * a directory: its data files (suffixes above) in sorted order — only those whose name
    starts with the split (``train.jsonl``, ``train-00000-of-00002.parquet``) or that sit
    under a ``<split>/`` subfolder when any do, else all of them; or a dataset saved with
    ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
  * anything else that does not exist locally: a Hugging Face hub name, opened with
    ``datasets.load_dataset(path, split=split)``.

JSON is parsed row by row with Python's `json` (not Arrow) on purpose: Arrow infers one
schema per file and rejects the whole file over one row with a wrong type, while we want to
report and skip that row. Local parquet is read with `pyarrow` directly (no cache writes).
`DataSpec.format` ("json", "jsonl", "parquet", "csv", "hub") overrides the suffix-based guess.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import json
import os
from typing import Optional

from rlhf_jax.data.validate import DataError, Malformed

FORMATS = ("json", "jsonl", "parquet", "csv", "hub")
SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
PARQUET_BATCH = 4096  # rows per record batch when a shard streams a parquet file
# Column roles the loaders know; `DataSpec.columns` maps a role to the dataset's column name.
ROLES = ("prompt", "completion", "messages", "chosen", "rejected", "responses", "ranks",
         "finished", "text")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where a dataset is and how to read it.

  Attributes:
    path: a local file / directory, or a hub dataset name (see module docstring).
    split: the split (hub datasets, directories with per-split files).
    format: "json" | "jsonl" | "parquet" | "csv" | "hub", or None to infer from the path.
    columns: role -> column name, e.g. ``{"prompt": "question", "completion": "answer"}``;
      roles not given use their own name. Roles: prompt, completion, messages, chosen,
      rejected, responses, ranks, finished, text.
    on_bad_row: "skip" (count and report bad rows) or "error" (raise `DataError` naming
      the first bad row).
    max_rows: read at most this many rows (the first ones), or None for all.
  """
  path: str
  split: str = "train"
  format: Optional[str] = None
  columns: dict = dataclasses.field(default_factory=dict)
  on_bad_row: str = "skip"
  max_rows: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
      raise DataError(f"DataSpec.path={self.path!r}: expected a file, directory or hub "
                      "dataset name")
    object.__setattr__(self, "path", os.fspath(self.path))
    if self.format is not None and self.format not in FORMATS:
      raise DataError(f"DataSpec.format={self.format!r} for {self.path}: expected one of "
                      f"{FORMATS} or None (infer from the suffix)")
    if self.on_bad_row not in ("skip", "error"):
      raise DataError(f"DataSpec.on_bad_row={self.on_bad_row!r}: expected 'skip' or 'error'")
    if self.max_rows is not None and (isinstance(self.max_rows, bool) or
                                      not isinstance(self.max_rows, int) or self.max_rows < 1):
      raise DataError(f"DataSpec.max_rows={self.max_rows!r}: expected a positive int or None")
    cols = dict(self.columns or {})
    for role, name in cols.items():
      if role not in ROLES:
        raise DataError(f"DataSpec.columns has unknown role {role!r} for {self.path}: "
                        f"expected roles among {ROLES}")
      if not isinstance(name, str) or not name:
        raise DataError(f"DataSpec.columns[{role!r}]={name!r}: expected a column name")
    object.__setattr__(self, "columns", cols)

  def column(self, role: str) -> str:
    """The dataset column holding `role`."""
    return self.columns.get(role, role)


@dataclasses.dataclass
class Source:
  """Rows of one dataset. `rows[i]` is a dict (or junk, reported as a bad row)."""
  name: str
  rows: list
  # (first row index, file, line numbers or None) per file, for error messages.
  parts: list = dataclasses.field(default_factory=list)
  # The global row index of each of `rows` when the source holds one shard of the dataset
  # (`open_source(spec, shard=...)`); None: rows 0, 1, ... (the whole dataset).
  indices: Optional[list] = None

  def numbered(self):
    """(global row index, row) pairs."""
    return zip(self.indices if self.indices is not None else range(len(self.rows)), self.rows)

  def locate(self, index: int) -> str:
    """'row 12 (a.jsonl line 14)': where row `index` came from."""
    if not self.parts:
      return f"row {index}"
    k = bisect.bisect_right([p[0] for p in self.parts], index) - 1
    start, file, lines = self.parts[k]
    where = os.path.basename(file) if file != self.name else ""
    if lines is not None:
      where = (where + " " if where else "") + f"line {lines[index - start]}"
    elif where:
      where += f" row {index - start}"
    return f"row {index}" + (f" ({where})" if where else "")

  def columns(self) -> set:
    """Union of keys over the rows (rows that are not mappings contribute none)."""
    keys: set = set()
    for row in self.rows:
      if isinstance(row, dict):
        keys.update(row)
    return keys


def open_source(spec: DataSpec, shard: Optional[tuple] = None) -> Source:
  """Reads the rows named by `spec` (at most `spec.max_rows`).

  Args:
    shard: (p, P): keep only the rows whose global index i has i % P == p (`Source.indices`
      holds them). JSON lines and parquet are streamed, so a shard costs its share of the
      memory; .json and .csv files are parsed whole first, then cut.

  Raises:
    DataError: naming the path, if it is missing, unreadable or not a dataset.
  """
  path = os.path.expanduser(spec.path)
  fmt = spec.format
  if shard is not None:
    p, count = shard
    if not (isinstance(p, int) and isinstance(count, int) and 0 <= p < count):
      raise DataError(f"open_source: shard={shard!r}: expected (p, P) with 0 <= p < P")
  if fmt == "hub" or (fmt is None and not os.path.exists(path) and _looks_like_hub(path)):
    return _cut(_open_hub(spec, shard), shard)
  limit = spec.max_rows
  files = data_files(spec)
  if files is None:
    return _cut(_open_saved(spec, path, shard), shard)
  source = Source(name=spec.path, rows=[], indices=None if shard is None else [])
  n = 0  # global rows so far
  for file in files:
    if limit is not None and n >= limit:
      break
    file_fmt = fmt or SUFFIXES.get(os.path.splitext(file)[1].lower())
    remaining = None if limit is None else limit - n
    if shard is None:
      rows, lines = _read_file(file, file_fmt, remaining)
      count, indices = len(rows), None
    elif file_fmt == "jsonl" or file_fmt == "parquet":
      rows, lines, count, indices = _read_shard(file, file_fmt, remaining, n, shard)
    else:
      rows, lines = _read_file(file, file_fmt, remaining)
      count = len(rows)
      indices = [i for i in range(n, n + count) if i % shard[1] == shard[0]]
      rows = [rows[i - n] for i in indices]
    source.parts.append((n, file, lines))
    source.rows.extend(rows)
    if indices is not None:
      source.indices.extend(indices)
    n += count
  return source


def data_files(spec: DataSpec) -> Optional[list]:
  """The local files `spec` reads, in order; None for a `save_to_disk` dataset directory.

  Raises:
    DataError: for a missing path or a file whose format cannot be told.
  """
  path = os.path.expanduser(spec.path)
  if not os.path.exists(path):
    raise DataError(f"{spec.path}: no such file or directory (expected a local "
                    ".json/.jsonl/.parquet/.csv file, a directory of them, or a hub dataset "
                    "name)")
  if os.path.isdir(path):
    if any(os.path.exists(os.path.join(path, f)) for f in
           ("dataset_info.json", "state.json", "dataset_dict.json")):
      return None
    files = _dir_files(path, spec.split, spec.format)
  else:
    files = [path]
  for file in files:
    if not (spec.format or SUFFIXES.get(os.path.splitext(file)[1].lower())):
      raise DataError(f"{file}: cannot tell the format from the suffix; expected .json, .csv, "
                      ".jsonl or .parquet, or set format=")
  return files


def is_hub(spec: DataSpec) -> bool:
  """Whether `open_source` reads `spec` from the Hugging Face hub."""
  path = os.path.expanduser(spec.path)
  return spec.format == "hub" or (spec.format is None and not os.path.exists(path) and
                                  _looks_like_hub(path))


def _cut(source: Source, shard: Optional[tuple]) -> Source:
  """`source` (already cut by the reader when it could) with the shard's global indices."""
  if shard is None or source.indices is not None:
    return source
  source.indices = list(range(shard[0], shard[0] + len(source.rows) * shard[1], shard[1]))
  return source


def _read_shard(file: str, fmt: str, limit: Optional[int], start: int,
                shard: tuple) -> tuple:
  """(own rows, line numbers of every row or None, rows in the file, own global indices).

  Streams the file: only this shard's rows are parsed and kept. The line numbers (an int64
  array, 8 bytes a row) keep error messages naming the file's line, as a whole load does.
  """
  p, count = shard
  rows, indices, lines = [], [], []
  if fmt == "parquet":
    try:
      import pyarrow.parquet as pq
      n = 0
      for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH):
        if limit is not None and n >= limit:
          break
        take = batch.num_rows if limit is None else min(batch.num_rows, limit - n)
        first = (p - (start + n)) % count  # first own row of this batch
        own = list(range(first, take, count))
        if own:
          import pyarrow as pa
          rows.extend(batch.take(pa.array(own)).to_pylist())
          indices.extend(start + n + i for i in own)
        n += take
    except Exception as e:  # pyarrow raises OSError, ValueError, NotImplementedError, ...
      raise DataError(f"{file}: cannot read it as parquet: {type(e).__name__}: {e}") from None
    return rows, None, n, indices
  try:
    with open(file, "r", encoding="utf-8-sig") as f:  # -sig: drop a byte-order mark
      # Universal newlines, split on "\n" only, as `_parse_lines` does after `read()`.
      for number, line in enumerate(f, start=1):
        if limit is not None and len(lines) >= limit:
          break
        if not line.strip():
          continue
        i = start + len(lines)
        lines.append(number)
        if i % count == p:
          indices.append(i)
          rows.append(_parse_line(line[:-1] if line.endswith("\n") else line))
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not UTF-8 text ({e})") from None
  except OSError as e:
    raise DataError(f"{file}: cannot read it as {fmt}: {e}") from None
  import numpy as np
  return rows, np.asarray(lines, np.int64), len(lines), indices


def _parse_line(line: str):
  try:
    return json.loads(line)
  except (ValueError, RecursionError) as e:  # ValueError: also ints over 4300 digits
    return Malformed(str(e)[:200])


def _looks_like_hub(path: str) -> bool:
  if os.path.splitext(path)[1].lower() in SUFFIXES or path.startswith(("/", ".", "~")):
    return False
  return 0 < len(path.split("/")) <= 2 and all(path.split("/")) and "\\" not in path


def _dir_files(path: str, split: str, fmt: Optional[str]) -> list[str]:
  found = []
  for root, dirs, names in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .cache/ and the like
    for name in names:
      if name.startswith("."):
        continue
      suffix = os.path.splitext(name)[1].lower()
      if (fmt is None and suffix in SUFFIXES) or (fmt is not None and
                                                 SUFFIXES.get(suffix) == fmt):
        found.append(os.path.join(root, name))
  found.sort()
  rel = lambda f: os.path.relpath(f, path)
  for_split = [f for f in found if split and (
      os.path.basename(f).startswith(split) or rel(f).split(os.sep)[0] == split)]
  files = for_split or found
  if not files:
    raise DataError(f"{path}: directory holds no .json/.jsonl/.parquet/.csv files")
  return files


def _read_file(file: str, fmt: str, limit: Optional[int]) -> tuple[list, Optional[list]]:
  try:
    if fmt == "parquet":
      import pyarrow.parquet as pq
      table = pq.read_table(file)
      if limit is not None:
        table = table.slice(0, limit)
      return table.to_pylist(), None
  except Exception as e:  # pyarrow raises OSError, ValueError, NotImplementedError, ...
    raise DataError(f"{file}: cannot read it as parquet: {type(e).__name__}: {e}") from None
  try:
    with open(file, "r", encoding="utf-8-sig") as f:  # -sig: drop a byte-order mark
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not UTF-8 text ({e})") from None
  except OSError as e:
    raise DataError(f"{file}: cannot read it as {fmt}: {e}") from None
  if fmt == "csv":
    return _parse_csv(file, text, limit)
  if fmt == "json":
    stripped = text.lstrip()
    if stripped.startswith("["):
      rows = _parse_json(file, text)
      return (rows if limit is None else rows[:limit]), None
    if stripped.startswith("{"):
      try:
        whole = json.loads(text)
      except (ValueError, RecursionError):
        whole = None  # probably JSON lines in a .json file
      if isinstance(whole, dict):
        (value,) = whole.values() if len(whole) == 1 else (None,)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
          return (value if limit is None else value[:limit]), None  # {"data": [rows]}
        return [whole], None  # a single row
  return _parse_lines(text, limit)


def _parse_json(file: str, text: str) -> list:
  try:
    rows = json.loads(text)
  except (ValueError, RecursionError) as e:  # ValueError: also ints over 4300 digits
    raise DataError(f"{file}: not valid JSON ({e})") from None
  return rows


def _parse_lines(text: str, limit: Optional[int]) -> tuple[list, list]:
  rows, lines = [], []
  # split on "\n" only: str.splitlines would also cut at U+2028 inside JSON strings.
  for number, line in enumerate(text.split("\n"), start=1):
    if limit is not None and len(rows) >= limit:
      break
    if not line.strip():
      continue
    rows.append(_parse_line(line))
    lines.append(number)
  return rows, lines


def _parse_csv(file: str, text: str, limit: Optional[int]) -> tuple[list, list]:
  reader = csv.DictReader(io.StringIO(text, newline=""))
  rows, lines = [], []
  try:
    for row in reader:
      if limit is not None and len(rows) >= limit:
        break
      rows.append(row)
      lines.append(reader.line_num)
  except csv.Error as e:
    raise DataError(f"{file}: not valid CSV near line {reader.line_num}: {e}") from None
  return rows, lines


def _limit_dataset(ds, spec: DataSpec, shard: Optional[tuple] = None) -> list:
  if spec.max_rows is not None and len(ds) > spec.max_rows:
    ds = ds.select(range(spec.max_rows))
  if shard is not None:  # Arrow is memory-mapped: only the shard's rows become Python
    ds = ds.select(range(shard[0], len(ds), shard[1]))
  return ds.to_list()


def _open_saved(spec: DataSpec, path: str, shard: Optional[tuple] = None) -> Source:
  import datasets
  try:
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      if spec.split not in ds:
        raise DataError(f"{spec.path}: saved dataset has no split {spec.split!r} "
                        f"(splits: {sorted(ds)})")
      ds = ds[spec.split]
  except DataError:
    raise
  except Exception as e:  # datasets raises many types for a broken save
    raise DataError(f"{spec.path}: cannot load the saved dataset: {e}") from None
  return Source(name=spec.path, rows=_limit_dataset(ds, spec, shard))


def _open_hub(spec: DataSpec, shard: Optional[tuple] = None) -> Source:
  import datasets
  try:
    ds = datasets.load_dataset(spec.path, split=spec.split)
  except Exception as e:  # network, missing dataset, missing split: all the user's to fix
    raise DataError(f"{spec.path}: not a local file or directory, and loading it as a hub "
                    f"dataset (split {spec.split!r}) failed: {type(e).__name__}: "
                    f"{str(e)[:500]}") from None
  if not isinstance(ds, datasets.Dataset):
    raise DataError(f"{spec.path}: expected one split of a dataset, got {type(ds).__name__}")
  return Source(name=spec.path, rows=_limit_dataset(ds, spec, shard))

