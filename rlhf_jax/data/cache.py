"""Tokenized datasets on disk: each process tokenizes its share, each reads only its batches.

    ds = load_cached("sft", spec, tokenizer, dict(max_prompt_len=64, max_len=256), cache_dir,
                     process_index=p, process_count=P, barrier=fn)   # a `tokenize.TokenArrays`
    ds.arrays["input_ids"][idx]   # [len(idx), 256]: only rows idx are read and padded
    ds.texts[i]                   # prompt i (kind "prompts")

Kinds and params are the loaders' (`tokenize`): "sft" (max_prompt_len, max_len),
"comparisons" (max_prompt_len, max_len, k_max, stop_ids), "prompts" (max_prompt_len),
"text" (seq_len, pack). The arrays are the ones the loader returns, row for row (the same
`tokenize.layout` pads them), so batches, and the 1-process vs N-process equality, do not
change; what changes is where they live:

  * tokenizing: process p of P reads rows i % P == p only (`sources.open_source(shard=)`,
    which streams JSON lines and parquet), tokenizes them a chunk of rows at a time and
    appends the unpadded token ids to its shard of the cache. Bad rows are counted per
    shard and merged into one report (`tokenize.finish`): every process raises the same
    error for the first bad row of the whole dataset, file and line included, and only
    process 0 logs the notes.
  * reading: every process memory-maps all shards and keeps O(N) small ints (the shard and
    offset of each example in row order); a batch reads and pads only its rows. Host memory
    is the rows of the batches it takes, not N x T.

Directory ``<cache_dir>/<kind>-<key>/``: the key hashes the kind, params, BOS policy, the
spec (path, split, format, columns, on_bad_row, max_rows), every data file's size and
mtime (a hub dataset's fingerprint) and the tokenizer (vocabulary / backend, specials,
chat template), so a change of any of them tokenizes anew; ``complete.json`` marks a
finished cache, reused by later runs with any process count. The cache directory must be
one all processes see (a shared filesystem on a cluster). Processes meet at `barrier`
(none for one process) and exchange small JSON status files, so an error on one process
is raised on all of them instead of leaving the others waiting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional

import numpy as np

from rlhf_jax.data import tokenize as tk
from rlhf_jax.data.sources import DataSpec, Source, data_files, is_hub, open_source
from rlhf_jax.data.validate import DataError, DataReport, RowLedger
from rlhf_jax.data.vocab import Encoder

log = logging.getLogger("rlhf_jax")
VERSION = 1         # bump when the on-disk layout or the tokenization changes
CHUNK_ROWS = 4096   # rows tokenized at a time (bounds the Python lists held at once)


def load_cached(kind: str, spec: DataSpec, tokenizer: Any, params: dict, cache_dir: str,
                add_bos: Optional[bool] = None, process_index: int = 0,
                process_count: int = 1,
                barrier: Optional[Callable[[str], None]] = None) -> tk.TokenArrays:
  """The loader of `kind` through the on-disk cache (module docstring).

  Raises:
    DataError: the loader's errors (bad rows with ``on_bad_row="error"``, nothing usable,
      unreadable files), on every process.
  """
  if kind not in tk.KINDS:
    raise ValueError(f"load_cached: kind={kind!r}: expected one of {tk.KINDS}")
  if not isinstance(spec, DataSpec):
    raise DataError(f"expected a data.DataSpec, got {type(spec).__name__}")
  params = tk.check_params(kind, params)
  pad_id = Encoder(tokenizer, add_bos, spec.path).pad_id  # no eos / pad: fail here
  root = os.path.join(os.path.expanduser(cache_dir),
                      f"{kind}-{_key(kind, spec, tokenizer, params, add_bos)}")
  done = os.path.join(root, "complete.json")
  barrier = barrier or (lambda name: None)
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise DataError(f"{spec.path}: cannot create the token cache directory {root} ({e}); "
                    "point RLHF_JAX_DATA_CACHE at a writable directory that every process "
                    "sees, or set RLHF_JAX_DATA_CACHE=off") from None
  # Every process must take the same branch (the build has barriers): reuse only when all
  # saw a complete cache (another job may finish it between two processes' looks).
  if all(_exchange(root, "complete", process_index, process_count, barrier,
                   lambda: os.path.exists(done))):
    meta = _read_json(done)
    log.info("%s: reusing the tokenized cache %s (%d examples)", spec.path, root, meta["n"])
    metas = [_read_json(os.path.join(root, _shard(s, meta["shards"]), "meta.json"))
             for s in range(meta["shards"])]
  else:
    metas = _build(kind, spec, tokenizer, params, add_bos, root, process_index,
                   process_count, barrier)
  report = tk.finish(spec, [DataReport(**m["report"]) for m in metas], metas[0]["field"],
                     metas[0]["moved_text"], log_notes=process_index == 0)
  shards = len(metas)
  if kind == "comparisons" and params["k_max"] == 0:
    params["k_max"] = max([m["k"] for m in metas] + [2])
  if process_index == 0 and not os.path.exists(done):
    _write_json(done, dict(shards=shards, n=report.n_used, version=VERSION))
    log.info("%s: tokenized into %s by %d process(es)", spec.path, root, shards)
  rows = CachedRows(root, shards, kind, params, pad_id)
  arrays = {name: CachedColumn(rows, name) for name in rows.names}
  chat = metas[0]["chat"]
  if kind == "text" and params["pack"]:
    return tk.TokenArrays(arrays, report)
  return tk.TokenArrays(arrays, report, texts=rows.texts() if kind == "prompts" else None,
                        row_ids=rows.row_ids, format=tk.format_name(chat))


# ---- building the cache ----------------------------------------------------------------------

def _shard(p: int, count: int) -> str:
  return f"shard-{p}-of-{count}"


def _build(kind, spec, tokenizer, params, add_bos, root, p, count, barrier) -> list:
  """Tokenizes this process's shard into `root`; returns every shard's meta (all agree)."""
  state = {}

  def read_keys():
    state["source"] = open_source(spec, shard=(p, count))
    return sorted(state["source"].columns())

  keys = set()
  for part in _exchange(root, "keys", p, count, barrier, read_keys):
    keys.update(part)
  metas = _exchange(root, "shard", p, count, barrier,
                    lambda: _tokenize_shard(kind, spec, tokenizer, params, add_bos,
                                            state["source"], keys,
                                            os.path.join(root, _shard(p, count))))
  state.clear()
  return metas


def _exchange(root: str, phase: str, p: int, count: int, barrier, fn) -> list:
  """Runs `fn` here, shares its JSON result (or its error) with all processes; returns all.

  An error on any process is raised on every process after the barrier, so none is left
  waiting for the others: the DataError's own message, or the failing process's exception.
  """
  try:
    status = dict(ok=fn())
  except Exception as e:  # shared, then raised below on every process
    status = dict(error=f"{type(e).__name__}: {e}", data_error=isinstance(e, DataError),
                  message=str(e))
    error = e
  else:
    error = None
  _write_json(os.path.join(root, f"{phase}-{p}-of-{count}.json"), status)
  barrier(f"rlhf_jax.data.cache.{phase}")
  if error is not None:
    raise error
  out = []
  for q in range(count):
    path = os.path.join(root, f"{phase}-{q}-of-{count}.json")
    if not os.path.exists(path):
      raise DataError(f"{path}: process {q} wrote it before the barrier, but process {p} "
                      "does not see it: the token cache directory must be one that every "
                      "process sees (a shared filesystem; RLHF_JAX_DATA_CACHE), or set "
                      "RLHF_JAX_DATA_CACHE=off to load every dataset whole on every process")
    other = _read_json(path)
    if "error" in other:
      if other["data_error"]:
        raise DataError(other["message"])
      raise RuntimeError(f"process {q} failed while tokenizing {root}: {other['error']}")
    out.append(other["ok"])
  return out


def _tokenize_shard(kind, spec, tokenizer, params, add_bos, source: Source, keys: set,
                    out_dir: str) -> dict:
  """Tokenizes `source` (this shard) chunk by chunk into `out_dir`; returns its meta."""
  os.makedirs(out_dir, exist_ok=True)
  ld = tk.Load(spec, tokenizer, add_bos, source=source, keys=keys)
  indices = source.indices if source.indices is not None else list(range(len(source.rows)))
  row_ids, seq_start, tok_start, levels, extra = [], [0], [0], [], []
  text_start, reports, k, chat = [0], [], 0, False
  field, moved_text = None, None
  with open(_tmp(out_dir, "tokens.bin"), "wb") as tokens, \
      open(_tmp(out_dir, "text.bin"), "wb") as texts:
    for lo in range(0, max(len(source.rows), 1), CHUNK_ROWS):
      # A fresh ledger per chunk: each chunk's report counts its own rows, merged below.
      ld.source = Source(name=source.name, rows=source.rows[lo:lo + CHUNK_ROWS],
                         parts=source.parts, indices=indices[lo:lo + CHUNK_ROWS])
      ld.ledger = RowLedger(spec.path, spec.on_bad_row, source.locate)
      ld.moved = set()
      ex = tk.tokenize_rows(kind, ld, params)
      reports.append(ex.report)
      field, moved_text, chat, k = ex.field, ex.moved_text, ex.chat, max(k, ex.k)
      for n, seqs in enumerate(ex.seqs):
        row_ids.append(ex.row_ids[n])
        extra.append(ex.extra[n])
        for seq, level in zip(seqs, ex.levels[n]):
          tokens.write(np.asarray(seq, np.int32).tobytes())
          tok_start.append(tok_start[-1] + len(seq))
          levels.append(level)
        seq_start.append(seq_start[-1] + len(seqs))
        if ex.texts is not None:
          data = ex.texts[n].encode("utf-8")
          texts.write(data)
          text_start.append(text_start[-1] + len(data))
  for name in ("tokens.bin", "text.bin"):
    os.replace(_tmp(out_dir, name), os.path.join(out_dir, name))
  for name, values, dtype in (("row_ids", row_ids, np.int64), ("seq_start", seq_start, np.int64),
                              ("tok_start", tok_start, np.int64), ("levels", levels, np.int32),
                              ("extra", extra, np.int32), ("text_start", text_start, np.int64)):
    with open(_tmp(out_dir, name + ".npy"), "wb") as f:
      np.save(f, np.asarray(values, dtype))
    os.replace(_tmp(out_dir, name + ".npy"), os.path.join(out_dir, name + ".npy"))
  report = DataReport.merge(spec.path, reports)
  meta = dict(report=report.__dict__, field=field, moved_text=moved_text, chat=chat, k=k,
              n=len(row_ids))
  _write_json(os.path.join(out_dir, "meta.json"), meta)
  return meta


def _tmp(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")


def _write_json(path: str, value) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f)
  os.replace(tmp, path)   # atomic: a reader never sees half a file


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _key(kind, spec: DataSpec, tokenizer, params: dict, add_bos) -> str:
  """A hash of everything the tokenized arrays depend on (module docstring)."""
  parts = dict(version=VERSION, kind=kind, add_bos=add_bos,
               params={k: (list(v) if isinstance(v, (tuple, list)) else v)
                       for k, v in sorted(params.items())},
               spec=dict(path=os.path.abspath(os.path.expanduser(spec.path)), split=spec.split,
                         format=spec.format, columns=sorted(spec.columns.items()),
                         on_bad_row=spec.on_bad_row, max_rows=spec.max_rows),
               data=_data_fingerprint(spec), tokenizer=tokenizer_fingerprint(tokenizer))
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def _data_fingerprint(spec: DataSpec) -> list:
  """(file, size, mtime) of every file read; a hub dataset's own fingerprint."""
  if is_hub(spec):
    import datasets
    try:
      return [spec.path, spec.split,
              datasets.load_dataset(spec.path, split=spec.split)._fingerprint]
    except Exception:  # open_source reports the real problem when it reads
      return [spec.path, spec.split]
  path = os.path.expanduser(spec.path)
  files = data_files(spec)
  if files is None:   # a save_to_disk directory: every file in it
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
  out = []
  for f in files:
    st = os.stat(f)
    out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
  return out


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of what decides the token ids: vocabulary / backend, specials, chat template."""
  h = hashlib.sha256(type(tokenizer).__name__.encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    h.update(backend.to_str().encode())
  else:
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  for attr in ("chat_template", "bos_token_id", "eos_token_id", "pad_token_id",
               "special_tokens_map", "added_tokens_decoder"):
    h.update(repr(getattr(tokenizer, attr, None)).encode())
  return h.hexdigest()


# ---- reading it ------------------------------------------------------------------------------

class CachedRows:
  """All shards of a cache, memory-mapped; `take(idx)` pads examples idx (row order).

  Holds O(N) small ints: each example's shard and offset (and, for packed text, each
  document's start in the token stream); the token ids stay on disk.
  """

  def __init__(self, root: str, shards: int, kind: str, params: dict, pad_id: int):
    self.kind, self.params, self.pad_id = kind, params, pad_id
    self.shards = []
    for s in range(shards):
      d = os.path.join(root, _shard(s, shards))
      arrays = {name: np.load(os.path.join(d, name + ".npy"), mmap_mode="r")
                for name in ("row_ids", "seq_start", "tok_start", "levels", "extra",
                             "text_start")}
      for name, dtype in (("tokens", np.int32), ("text", np.uint8)):
        path = os.path.join(d, name + ".bin")
        # np.memmap cannot map an empty file.
        arrays[name] = np.memmap(path, dtype, "r") if os.path.getsize(path) else \
            np.zeros(0, dtype)
      self.shards.append(arrays)
    rows = np.concatenate([s["row_ids"] for s in self.shards])
    order = np.argsort(rows, kind="stable")
    self.row_ids = rows[order]
    self.shard_of = np.concatenate([np.full(len(s["row_ids"]), k, np.int32)
                                    for k, s in enumerate(self.shards)])[order]
    self.offset_of = np.concatenate([np.arange(len(s["row_ids"]))
                                     for s in self.shards])[order]
    self.packed = kind == "text" and params["pack"]
    if self.packed:
      # Documents in row order make one token stream; row c is its tokens [cT, (c+1)T).
      lengths = np.concatenate([np.diff(s["tok_start"]) for s in self.shards])[order]
      self.doc_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
      self.n = int(-(-self.doc_start[-1] // params["seq_len"]))
    else:
      self.n = len(self.row_ids)
    self._last = (None, None)
    probe = self.take(np.zeros(1, np.int64))
    self.names = list(probe)
    self.specs = {k: (v.shape[1:], v.dtype) for k, v in probe.items()}

  def take(self, idx) -> dict:
    """name -> array of examples `idx` (ints in [0, N)), as the loader lays them out."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    key = idx.tobytes()
    if self._last[0] == key:   # the columns of one batch share one read
      return self._last[1]
    if idx.size and (idx.min() < 0 or idx.max() >= self.n):
      raise IndexError(f"example index out of range [0, {self.n})")
    if self.packed:
      out = self._take_packed(idx)
    else:
      seqs, levels, extra = [], [], []
      for e in idx:
        sh = self.shards[self.shard_of[e]]
        o = self.offset_of[e]
        first, last = int(sh["seq_start"][o]), int(sh["seq_start"][o + 1])
        starts = sh["tok_start"][first:last + 1]
        seqs.append([sh["tokens"][starts[j]:starts[j + 1]] for j in range(last - first)])
        levels.append(list(sh["levels"][first:last]))
        extra.append(int(sh["extra"][o]))
      out = tk.layout(self.kind, self.params, self.pad_id, seqs, levels, extra)
    self._last = (key, out)
    return out

  def _take_packed(self, idx) -> dict:
    seq_len, rows = self.params["seq_len"], []
    for c in idx:
      lo, hi = int(c) * seq_len, min((int(c) + 1) * seq_len, int(self.doc_start[-1]))
      d = int(np.searchsorted(self.doc_start, lo, side="right")) - 1
      pieces = []
      while lo < hi:
        e = self.shard_of[d], self.offset_of[d]
        sh = self.shards[e[0]]
        start = int(sh["tok_start"][e[1]]) + lo - int(self.doc_start[d])
        take = min(hi, int(self.doc_start[d + 1])) - lo
        pieces.append(sh["tokens"][start:start + take])
        lo, d = lo + take, d + 1
      rows.append(tk.pack_text(np.concatenate(pieces).astype(np.int32), seq_len,
                               self.pad_id))
    if not rows:
      return tk.pack_text(np.zeros(0, np.int32), seq_len, self.pad_id)
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

  def texts(self) -> "CachedTexts":
    return CachedTexts(self)


class CachedColumn:
  """One array of a cached dataset: len, shape, dtype and rows by index, read on demand.

  Indexing takes an int, a slice or an int array along the first axis (what
  `BatchIterator` and the trainers' evaluation do), optionally followed by numpy indices of
  the other axes; `lazy_rows` tells `BatchIterator` not
  to turn it into one dense array.
  """
  lazy_rows = True

  def __init__(self, rows: CachedRows, name: str):
    self.rows, self.name = rows, name
    tail, self.dtype = rows.specs[name]
    self.shape = (rows.n,) + tuple(tail)
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.rows.n

  def __getitem__(self, key):
    if isinstance(key, tuple):
      # numpy-style `col[rows, ...]`: read the rows, then index the rest as numpy does
      # (e.g. `last_index[0, k]`).
      if not key:
        return np.asarray(self)
      first = self[key[0]]
      rest = key[1:]
      if isinstance(key[0], (int, np.integer)):
        return first[rest] if rest else first
      return first[(slice(None),) + rest]
    if isinstance(key, (int, np.integer)):
      n = self.rows.n
      if not -n <= key < n:
        raise IndexError(f"index {key} out of range for {n} examples")
      return self.rows.take([int(key) % n])[self.name][0]
    if isinstance(key, slice):
      key = np.arange(*key.indices(self.rows.n))
    return self.rows.take(key)[self.name]

  def __array__(self, dtype=None, copy=None):
    """The whole dense array (what the cache avoids: for small data and tests)."""
    out = self.rows.take(np.arange(self.rows.n))[self.name]
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return f"CachedColumn({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class CachedTexts:
  """The prompt strings of a cached "prompts" dataset, read on demand by example index."""

  def __init__(self, rows: CachedRows):
    self.rows = rows

  def __len__(self) -> int:
    return self.rows.n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self.rows.n))]
    i = int(i)
    if not -self.rows.n <= i < self.rows.n:
      raise IndexError(f"text {i} out of range for {self.rows.n} prompts")
    i %= self.rows.n
    sh = self.rows.shards[self.rows.shard_of[i]]
    o = self.rows.offset_of[i]
    return bytes(sh["text"][int(sh["text_start"][o]):int(sh["text_start"][o + 1])]
                 ).decode("utf-8")

  def __iter__(self):
    return (self[i] for i in range(self.rows.n))
