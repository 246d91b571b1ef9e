"""Host memory of the SFT data: the whole dense load vs the per-host on-disk token cache.

    python bench/data_memory.py --rows 200000 --max_len 256 --processes 2

Writes a JSON-lines file of `--rows` prompt / completion rows (word-level tokenizer built in
code: ~10-20 prompt and ~20-60 completion tokens a row), then measures, each in fresh
processes (spawned, so nothing is shared):

  * dense: one process runs `data.load_sft` (every row, [N, max_len] x 3 int32 arrays) and
    takes 20 batches, as every host did before the cache;
  * cache cold: `--processes` processes run `data.load_cached("sft", ...)` (each tokenizes
    rows i % P == p into the cache, meeting at a file barrier) and take 20 host batches;
  * cache warm: the same again, reusing the cache.

Per process: VmRSS after the imports (the base), the peak (VmHWM) and VmRSS after the 20
batches, as increments over the base, from /proc/self/status (Linux). Wall times are for
orientation only: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(500)]
BATCH, STEPS = 64, 20


def _status(field: str) -> int:
  """A /proc/self/status memory field in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _tokenizer():
  import tokenizers
  import transformers
  vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
      unk_token="<unk>")


def _write_rows(path: str, n: int) -> None:
  import numpy as np
  rng = np.random.default_rng(0)
  words = np.asarray(WORDS)
  with open(path, "w") as f:
    for _ in range(n):
      p = " ".join(rng.choice(words, rng.integers(10, 21)))
      c = " ".join(rng.choice(words, rng.integers(20, 61)))
      f.write(json.dumps(dict(prompt=p, completion=c)) + "\n")


def _file_barrier(directory: str, p: int, count: int):
  step = [0]

  def barrier(name):
    step[0] += 1
    open(os.path.join(directory, f"{step[0]}-{p}"), "w").close()
    while not all(os.path.exists(os.path.join(directory, f"{step[0]}-{q}"))
                  for q in range(count)):
      time.sleep(0.01)
  return barrier


def _child(mode: str, path: str, cache_dir: str, barrier_dir: str, p: int, count: int,
           max_len: int, queue) -> None:
  sys.path.insert(0, REPO)
  from rlhf_jax import data
  tok = _tokenizer()
  spec = data.DataSpec(path=path)
  base = _status("VmRSS")
  t0 = time.time()
  if mode == "dense":
    ds = data.load_sft(spec, tok, 32, max_len)
  else:
    ds = data.load_cached("sft", spec, tok, dict(max_prompt_len=32, max_len=max_len),
                          cache_dir, process_index=p, process_count=count,
                          barrier=_file_barrier(barrier_dir, p, count))
  load_s = time.time() - t0
  after_load = _status("VmRSS")
  it = data.BatchIterator(ds.arrays, BATCH, seed=0, process_index=p, process_count=count)
  for _ in range(STEPS):
    next(it)
  queue.put(dict(mode=mode, process=p, n=len(ds), base=base, load_s=load_s,
                 load_rss=after_load - base, peak=_status("VmHWM") - base,
                 rss=_status("VmRSS") - base))


def _run(mode: str, count: int, args, tag: str) -> list:
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  barrier_dir = os.path.join(args.workdir, f"barrier-{tag}")
  os.makedirs(barrier_dir, exist_ok=True)
  procs = [ctx.Process(target=_child, args=(mode, args.path, args.cache_dir, barrier_dir, p,
                                            count, args.max_len, queue))
           for p in range(count)]
  for proc in procs:
    proc.start()
  out = sorted((queue.get(timeout=3600) for _ in procs), key=lambda r: r["process"])
  for proc in procs:
    proc.join()
  return [dict(r, run=tag) for r in out]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=200_000)
  ap.add_argument("--max_len", type=int, default=256)
  ap.add_argument("--processes", type=int, default=2)
  ap.add_argument("--workdir", default="/tmp/rlhf_jax_data_memory")
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  args.path = os.path.join(args.workdir, f"sft_{args.rows}.jsonl")
  args.cache_dir = os.path.join(args.workdir, f"cache-{time.time_ns()}")
  if not os.path.exists(args.path):
    _write_rows(args.path, args.rows)
  mb = 1 / 2**20
  print(f"{args.rows} rows ({os.path.getsize(args.path) * mb:.0f} MiB jsonl), max_len "
        f"{args.max_len}: dense arrays = {3 * args.rows * args.max_len * 4 * mb:.0f} MiB")
  rows = (_run("dense", 1, args, "dense") + _run("cached", args.processes, args, "cache cold")
          + _run("cached", args.processes, args, "cache warm"))
  print("| run | process | examples | load s | RSS after load MiB | peak MiB | RSS after "
        f"{STEPS} batches MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['run']} | {r['process']} of {1 if r['run'] == 'dense' else args.processes} "
          f"| {r['n']} | {r['load_s']:.1f} | {r['load_rss'] * mb:.0f} | {r['peak'] * mb:.0f} "
          f"| {r['rss'] * mb:.0f} |")
  print(f"(increments over each process's RSS after its imports, "
        f"{rows[0]['base'] * mb:.0f} MiB for the dense one)")


if __name__ == "__main__":
  main()
