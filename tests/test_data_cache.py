"""The on-disk token cache (`data.load_cached`): same arrays and batches, a host's share.

The reference is the whole-dataset loader of the same kind (`data.load_sft`, ...), which
tests/test_data.py checks against token ids built independently from the tokenizer. Here:

  * cached == whole load, array for array, report for report, for 1 and 3 processes
    (threads meeting at a `threading.Barrier`: the same code path as processes, cheaper);
  * the host slices of P = 2 processes, each iterating its own cache view, concatenate to
    the global batches of one process over the dense arrays (bucketing included);
  * two real processes (spawned, a file barrier): each tokenizes only rows i % 2 == p and
    gets exactly its slices;
  * a process holds no dense N x T array: only O(N) small ints, rows read per batch;
  * the cache is rebuilt when the data file or the tokenizer changes, reused otherwise;
  * bad rows: counted once over all shards, and on_bad_row="error" names file and line.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.data import cache, sources
from test_data import WORDS, make_tokenizer, write

N_ROWS = 61


def _words(rng, lo, hi):
  return " ".join(rng.choice(WORDS[:-3], int(rng.integers(lo, hi))))


def _rows(seed: int = 0) -> list:
  """Prompt / completion / K-way ranking / text rows with trailing spaces and bad rows."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(N_ROWS):
    k = int(rng.integers(2, 5))
    rows.append(dict(prompt=_words(rng, 1, 5) + (" " if i % 5 == 0 else ""),
                     completion=_words(rng, 1, 6), text=_words(rng, 1, 9),
                     responses=[_words(rng, 1, 4) for _ in range(k)],
                     ranks=[int(r) for r in rng.integers(0, 3, k)]))
  rows[7]["prompt"] = 3          # wrong_type
  rows[12] = "junk"              # not_an_object
  return rows


def _write(path, rows, tail=""):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    f.write(tail)
  return str(path)


CASES = {
    "sft": (dict(max_prompt_len=5, max_len=10),
            lambda spec, tok: data.load_sft(spec, tok, 5, 10)),
    "comparisons": (dict(max_prompt_len=5, max_len=10, k_max=0),
                    lambda spec, tok: data.load_comparisons(spec, tok, 5, 10, 0)),
    "prompts": (dict(max_prompt_len=5), lambda spec, tok: data.load_prompts(spec, tok, 5)),
    "text": (dict(seq_len=7, pack=True), lambda spec, tok: data.load_text(spec, tok, 7)),
    "text_unpacked": (dict(seq_len=7, pack=False),
                      lambda spec, tok: data.load_text(spec, tok, 7, pack=False)),
}


def _spec(path, kind, **kw):
  cols = dict(responses="responses") if kind == "comparisons" else {}
  return data.DataSpec(path=path, columns=cols, **kw)


def _load_threads(kind, spec, params, cache_dir, processes):
  """`load_cached` as `processes` threads (one tokenizer each); returns every view, or
  raises the error all of them raised."""
  out, errors = [None] * processes, [None] * processes
  bar = threading.Barrier(processes)

  def run(p):
    try:
      out[p] = data.load_cached(kind.split("_")[0], spec, make_tokenizer(), params, cache_dir,
                                process_index=p, process_count=processes,
                                barrier=lambda name: bar.wait(timeout=60))
    except Exception as e:  # re-raised in the test's thread
      errors[p] = e
  threads = [threading.Thread(target=run, args=(p,)) for p in range(processes)]
  [t.start() for t in threads]
  [t.join() for t in threads]
  if any(e is not None for e in errors):   # then every process raises the same error
    assert len({f"{type(e).__name__}: {e}" for e in errors}) == 1, errors
    raise errors[0]
  return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("cache") / "rows.jsonl", _rows(), "{bad json\n")


@pytest.mark.parametrize("processes", [1, 3])
@pytest.mark.parametrize("kind", list(CASES))
def test_cached_equals_whole_load(dataset, tmp_path, kind, processes):
  params, dense_fn = CASES[kind]
  spec = _spec(dataset, kind)
  dense = dense_fn(spec, make_tokenizer())
  for view in _load_threads(kind, spec, params, str(tmp_path), processes):
    assert str(view.report) == str(dense.report)
    assert view.report.skipped == dense.report.skipped and view.format == dense.format
    assert sorted(view.arrays) == sorted(dense.arrays)
    for name, want in dense.arrays.items():
      col = view.arrays[name]
      assert isinstance(col, cache.CachedColumn) and col.shape == want.shape
      np.testing.assert_array_equal(np.asarray(col), want, err_msg=name)
      np.testing.assert_array_equal(col[[5, 0, 5]], want[[5, 0, 5]], err_msg=name)
      np.testing.assert_array_equal(col[2:7], want[2:7], err_msg=name)
      np.testing.assert_array_equal(col[-1], want[-1], err_msg=name)
      if want.ndim > 1:   # numpy-style indices of the other axes after the rows
        np.testing.assert_array_equal(col[1, -1], want[1, -1], err_msg=name)
        np.testing.assert_array_equal(col[[4, 1], 1:], want[[4, 1], 1:], err_msg=name)
        np.testing.assert_array_equal(col[2:5, 0], want[2:5, 0], err_msg=name)
    if dense.row_ids is None:
      assert view.row_ids is None
    else:
      np.testing.assert_array_equal(view.row_ids, dense.row_ids)
    if dense.texts is not None:
      assert list(view.texts) == dense.texts and view.texts[3] == dense.texts[3]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
  """Tokenize 8 rows at a time and stream parquet 16 rows a batch: the boundaries show."""
  monkeypatch.setattr(cache, "CHUNK_ROWS", 8)
  monkeypatch.setattr(sources, "PARQUET_BATCH", 16)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "dir"])
def test_other_formats_and_max_rows(tmp_path, fmt):
  """Parquet (streamed by record batch), csv, a .json list and a directory of parts."""
  rng = np.random.default_rng(2)
  rows = [dict(prompt=_words(rng, 1, 4), completion=_words(rng, 1, 5)) for _ in range(90)]
  rows[41]["completion"] = ""   # a bad row past the first parquet record batch
  if fmt == "dir":
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "train-0.jsonl", rows[:50])
    write(tmp_path / "d" / "train-1.parquet", rows[50:])
    path = str(tmp_path / "d")
  else:
    path = write(tmp_path / f"rows.{fmt}", rows)
  for max_rows in (None, 73):
    spec = data.DataSpec(path=path, max_rows=max_rows)
    dense = data.load_sft(spec, make_tokenizer(), 5, 10)
    for view in _load_threads("sft", spec, CASES["sft"][0], str(tmp_path / "c"), 3):
      assert str(view.report) == str(dense.report)
      for name, want in dense.arrays.items():
        np.testing.assert_array_equal(np.asarray(view.arrays[name]), want, err_msg=name)


def test_shards_hold_their_rows_and_batches_match_one_process(dataset, tmp_path):
  spec, params = _spec(dataset, "comparisons"), CASES["comparisons"][0]
  dense = CASES["comparisons"][1](spec, make_tokenizer())
  views = _load_threads("comparisons", spec, params, str(tmp_path), 2)
  (root,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
  for p in range(2):   # process p tokenized rows i % 2 == p, and nothing else
    rows = np.load(os.path.join(root, f"shard-{p}-of-2", "row_ids.npy"))
    np.testing.assert_array_equal(rows, dense.row_ids[dense.row_ids % 2 == p])
  bucketing = data.Bucketing(("input_ids", "attention_mask"), smallest=4)
  ref = data.BatchIterator(dense.arrays, 8, seed=3, bucketing=bucketing)
  hosts = [data.BatchIterator(v.arrays, 8, seed=3, process_index=p, process_count=2,
                              bucketing=bucketing) for p, v in enumerate(views)]
  for _ in range(2 * ref.steps_per_epoch + 1):   # past an epoch boundary
    want = next(ref)
    got = [next(h) for h in hosts]
    for name in want:
      np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), want[name])


def _file_barrier(directory, p, count):
  step = [0]

  def barrier(name):
    step[0] += 1
    open(os.path.join(directory, f"{step[0]}-{p}"), "w").close()
    deadline = time.time() + 60
    while not all(os.path.exists(os.path.join(directory, f"{step[0]}-{q}"))
                  for q in range(count)):
      if time.time() > deadline:
        raise TimeoutError(f"barrier {name}")
      time.sleep(0.01)
  return barrier


def _process_main(path, cache_dir, barrier_dir, p, queue):
  """One 'host': its cache view, its first batches, and what it keeps in memory."""
  ds = data.load_cached("sft", data.DataSpec(path=path), make_tokenizer(),
                        dict(max_prompt_len=5, max_len=10), cache_dir, process_index=p,
                        process_count=2, barrier=_file_barrier(barrier_dir, p, 2))
  it = data.BatchIterator(ds.arrays, 6, seed=1, process_index=p, process_count=2)
  batches = [next(it) for _ in range(4)]
  rows = ds.arrays["input_ids"].rows
  held = sum(v.nbytes for v in vars(rows).values() if type(v) is np.ndarray)
  queue.put((p, batches, held, [type(v).__name__ for v in ds.arrays.values()]))


def test_two_processes_get_their_slices(dataset, tmp_path):
  (tmp_path / "barrier").mkdir()
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  procs = [ctx.Process(target=_process_main, args=(dataset, str(tmp_path / "cache"),
                                                   str(tmp_path / "barrier"), p, queue))
           for p in range(2)]
  [proc.start() for proc in procs]
  results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
  [proc.join(timeout=30) for proc in procs]
  assert all(proc.exitcode == 0 for proc in procs)
  dense = data.load_sft(data.DataSpec(path=dataset), make_tokenizer(), 5, 10)
  ref = data.BatchIterator(dense.arrays, 6, seed=1)
  n = len(dense.arrays["input_ids"])
  for step in range(4):
    want = next(ref)
    for name in want:
      got = np.concatenate([results[p][0][step][name] for p in range(2)])
      np.testing.assert_array_equal(got, want[name])
  for p in range(2):
    _, held, types = results[p]
    assert set(types) == {"CachedColumn"}
    assert held <= 32 * n, held   # row ids, shard and offset per example: no N x T array


def test_memory_per_batch_is_the_batch(tmp_path):
  """Reading one host batch allocates about the batch, not the dataset (tracemalloc)."""
  import tracemalloc
  rng = np.random.default_rng(1)
  rows = [dict(prompt=_words(rng, 1, 4), completion=_words(rng, 1, 4)) for _ in range(3000)]
  path = _write(tmp_path / "big.jsonl", rows)
  spec, T = data.DataSpec(path=path), 256
  ds = data.load_cached("sft", spec, make_tokenizer(), dict(max_prompt_len=8, max_len=T),
                        str(tmp_path / "cache"))
  tracemalloc.start()
  it = data.BatchIterator(ds.arrays, 16, seed=0, process_index=1, process_count=2)
  batch = next(it)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  batch_bytes = sum(v.nbytes for v in batch.values())
  dense_bytes = 3 * len(rows) * T * 4
  assert batch_bytes == 3 * 8 * T * 4
  assert peak < 20 * batch_bytes < dense_bytes / 10, (peak, batch_bytes, dense_bytes)


def test_cache_is_rebuilt_when_the_file_or_tokenizer_changes(tmp_path, caplog):
  path = _write(tmp_path / "d.jsonl", _rows(0))
  spec, params, cache_dir = data.DataSpec(path=path), dict(max_prompt_len=5), str(tmp_path / "c")

  def load(tok):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_jax"):
      ds = data.load_cached("prompts", spec, tok, params, cache_dir)
    return ds, "reusing the tokenized cache" in caplog.text

  first, reused = load(make_tokenizer())
  assert not reused
  again, reused = load(make_tokenizer())
  assert reused and list(again.texts) == list(first.texts)
  time.sleep(0.01)
  _write(tmp_path / "d.jsonl", _rows(1))             # new content
  changed, reused = load(make_tokenizer())
  assert not reused
  want = data.load_prompts(spec, make_tokenizer(), 5)
  np.testing.assert_array_equal(np.asarray(changed.arrays["input_ids"]),
                                want.arrays["input_ids"])
  other_tok, reused = load(make_tokenizer(vocab_extra=3))  # another vocabulary
  assert not reused
  bos_tok, reused = load(make_tokenizer(bos_processor=True))  # adds <bos> now
  assert not reused
  assert bos_tok.arrays["input_ids"][0][-int(bos_tok.arrays["attention_mask"][0].sum())] == 2
  assert len(os.listdir(cache_dir)) == 4


def test_bad_row_error_names_file_and_line_from_any_shard(tmp_path):
  # Bad rows 7 (line 8) and 12 (line 14, after a blank line): the error names the first.
  lines = [json.dumps(r) for r in _rows()]
  path = str(tmp_path / "d.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines[:10] + [""] + lines[10:]) + "\n")
  spec = data.DataSpec(path=path, on_bad_row="error")
  with pytest.raises(data.DataError) as dense:
    data.load_sft(spec, make_tokenizer(), 5, 10)
  for processes in (1, 2, 3):  # row 7 is on shard 7 % P: every process raises the same
    with pytest.raises(data.DataError) as got:
      _load_threads("sft", spec, CASES["sft"][0], str(tmp_path / f"c{processes}"), processes)
    assert str(got.value) == str(dense.value)
    assert "d.jsonl" in str(got.value) and "row 7 (line 8)" in str(got.value)
    assert "field 'prompt'" in str(got.value) and "2 bad of 61" in str(got.value)


def test_an_error_on_one_process_is_raised_on_all(dataset, tmp_path, monkeypatch):
  """A failure while one process tokenizes reaches the others (none waits forever)."""
  real = cache.tk.tokenize_rows

  def fails_on_odd_shard(kind, ld, params):
    if ld.source.indices and ld.source.indices[0] % 2 == 1:
      raise data.DataError("shard 1 cannot read its rows")
    return real(kind, ld, params)

  monkeypatch.setattr(cache.tk, "tokenize_rows", fails_on_odd_shard)
  with pytest.raises(data.DataError, match="shard 1 cannot read its rows"):
    _load_threads("sft", data.DataSpec(path=dataset), CASES["sft"][0], str(tmp_path), 2)


def test_nothing_usable_raises_on_every_process(tmp_path):
  path = _write(tmp_path / "d.jsonl", [dict(prompt="hello")] * 4)   # no completion
  spec = data.DataSpec(path=path)
  with pytest.raises(data.DataError) as dense:
    data.load_sft(spec, make_tokenizer(), 5, 10)
  with pytest.raises(data.DataError) as got:
    _load_threads("sft", spec, CASES["sft"][0], str(tmp_path / "c"), 2)
  assert str(got.value) == str(dense.value) and "none of the 4 rows" in str(got.value)


def test_cache_directory_is_the_runs_workdir_unless_the_environment_names_one(
    tmp_path, monkeypatch):
  # run.run points the cache at <workdir>/data_cache: the workdir is shared by every
  # process of a job, where ~/.cache is usually per node.
  from rlhf_jax.trainers import batching
  monkeypatch.setattr(batching, "_workdir_cache", None)
  monkeypatch.delenv(batching.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert batching.data_cache_dir() == str(tmp_path / "xdg" / "rlhf_jax" / "data")
  batching.use_workdir_cache(str(tmp_path / "run"))
  assert batching.data_cache_dir() == str(tmp_path / "run" / "data_cache")
  monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path / "mine"))
  assert batching.data_cache_dir() == str(tmp_path / "mine")
  monkeypatch.setenv(batching.CACHE_ENV, "off")
  assert batching.data_cache_dir() is None
