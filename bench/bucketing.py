"""SFT steps on variable-length data with and without length bucketing (`data.bucket_min_len`).

Both runs take the same global batches in the same order from `data.BatchIterator` (same
seed) over right-padded rows whose lengths follow a log-normal distribution (instruction
data is long-tailed), and run the SFT trainer's own jitted step (`train_step.build_step`).
Bucketing off: every batch is `--max-len` columns. On: each batch is cut to the smallest of
`--bucket-min-len · 2^i` (or max_len) that holds its longest row. Every bucket the timed
batches use is compiled once before timing (compile time reported apart), so the timed steps
compile nothing (counted). Figures: real (non-pad) tokens/s and the speed-up.

Prediction (printed before timing): a step's cost is about linear in its padded length at
these sizes (the MLP / LM head dominate attention), so the speed-up ≈ Σ max_len / Σ bucket
over the timed batches.

    python bench/bucketing.py                       # GPT-2-small widths, 2 layers
    python bench/bucketing.py --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import train_step  # noqa: E402

SECTION = "## Length bucketing: SFT steps on variable-length rows"
INTRO = """
`bench/bucketing.py`: the SFT trainer's jitted step over the same `data.BatchIterator` batches
(same seed, same order) of right-padded rows with log-normal lengths, with bucketing off
(every batch `max_len` columns) and on (each batch cut to the smallest
`bucket_min_len · 2^i` or `max_len` holding its longest row). All buckets are compiled before
timing; `compiles` counts XLA compilations during the timed steps. Real tokens/s counts
non-pad tokens. Prediction = Σ max_len / Σ bucket over the timed batches (cost ∝ length).
"""
HEADER = ("| date | shape | batch × max_len | lengths (median, p90) | buckets used | "
          "off: step s, real tok/s | on: step s, real tok/s | speed-up (predicted) | "
          "compile s (off / on) | compiles | machine, load | versions | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def make_rows(rs, n: int, max_len: int, median: float, sigma: float, vocab: int):
  import numpy as np
  lengths = np.clip(np.round(rs.lognormal(np.log(median), sigma, size=n)), 8, max_len)
  lengths = lengths.astype(np.int64)
  cols = np.arange(max_len)
  mask = (cols < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rs.randint(1, vocab, size=(n, max_len)), 0).astype(np.int32)
  loss_mask = mask * (cols >= (lengths // 3)[:, None]).astype(np.int32)  # prompt = first third
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask), lengths


def run_mode(cfg, mesh, arrays, args, bucketing):
  import jax
  from rlhf_jax import data, sharding
  it = data.BatchIterator(arrays, args.batch, seed=0, bucketing=bucketing)
  batches = [next(it) for _ in range(args.steps)]
  state, step_fn = train_step.build_step("sft", cfg, mesh, 2 * args.steps + 8, 1)
  t0 = time.perf_counter()
  compiled = set()
  for b in batches:                      # one step per distinct shape: the compiles
    shape = b["input_ids"].shape
    if shape not in compiled:
      state, m = step_fn(state, sharding.host_to_global(mesh, b))
      jax.block_until_ready(m)
      compiled.add(shape)
  warm_s = time.perf_counter() - t0
  times = []
  with common.CompileCounter() as cc:
    for b in batches:
      t0 = time.perf_counter()
      state, m = step_fn(state, sharding.host_to_global(mesh, b))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  real = sum(int(b["attention_mask"].sum()) for b in batches)
  lengths = [b["input_ids"].shape[1] for b in batches]
  steady = sum(times) / len(times)
  # warm-up = one compile + one step per shape; subtract a steady step per shape
  return dict(step_s=steady, real_tok_s=real / sum(times), lengths=lengths,
              compile_s=max(warm_s - steady * len(compiled), 0.0), compiles=cc.count)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(common.PRESET_SHAPES), default="gpt2")
  ap.add_argument("--layers", type=int, default=2, help="override the shape's layer count")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--max-len", type=int, default=256)
  ap.add_argument("--bucket-min-len", type=int, default=32)
  ap.add_argument("--median-len", type=float, default=64.0)
  ap.add_argument("--sigma", type=float, default=0.7, help="log-normal sigma of the lengths")
  ap.add_argument("--rows", type=int, default=512)
  ap.add_argument("--steps", type=int, default=12, help="timed steps per mode")
  ap.add_argument("--append", metavar="MD")
  args = ap.parse_args(argv)

  import jax
  import numpy as np
  from rlhf_jax import data, models, sharding

  cfg = models.get_preset(common.PRESET_SHAPES[args.shape])
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  arrays, lengths = make_rows(np.random.RandomState(0), args.rows, args.max_len,
                              args.median_len, args.sigma, cfg.vocab_size)
  bucketing = data.Bucketing(("input_ids", "attention_mask", "loss_mask"), args.bucket_min_len)
  probe = data.BatchIterator(arrays, args.batch, seed=0, bucketing=bucketing)
  planned = [next(probe)["input_ids"].shape[1] for _ in range(args.steps)]
  predicted = args.steps * args.max_len / sum(planned)
  load_start = common.load()
  print(f"# {args.shape} ({cfg.num_layers}x{cfg.hidden_size}, V {cfg.vocab_size}); lengths "
        f"median {np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f}; buckets of the "
        f"timed batches {dict(collections.Counter(planned))}; predicted speed-up "
        f"{predicted:.2f}x; load {load_start:.2f}", flush=True)
  off = run_mode(cfg, mesh, arrays, args, None)
  print(f"off: step {off['step_s']:.3f} s, {off['real_tok_s']:.0f} real tok/s, "
        f"compile {off['compile_s']:.1f} s, compiles {off['compiles']}", flush=True)
  on = run_mode(cfg, mesh, arrays, args, bucketing)
  print(f"on:  step {on['step_s']:.3f} s, {on['real_tok_s']:.0f} real tok/s, "
        f"compile {on['compile_s']:.1f} s, compiles {on['compiles']}", flush=True)
  assert on["lengths"] == planned
  speedup = on["real_tok_s"] / off["real_tok_s"]
  print(f"speed-up {speedup:.2f}x (predicted {predicted:.2f}x)")
  row = (f"| {common.today()} | {common.shape_cell(args.shape, cfg)} "
         f"| {args.batch} × {args.max_len} | {np.median(lengths):.0f}, "
         f"{np.percentile(lengths, 90):.0f} | "
         f"{', '.join(f'{k}×{v}' for k, v in sorted(collections.Counter(planned).items()))} | "
         f"{off['step_s']:.3f}, {off['real_tok_s']:.0f} | {on['step_s']:.3f}, "
         f"{on['real_tok_s']:.0f} | {speedup:.2f}× ({predicted:.2f}×) | "
         f"{off['compile_s']:.1f} / {on['compile_s']:.1f} | {off['compiles'] + on['compiles']} "
         + common.context_cells([load_start, common.load()], argv, __file__))
  common.publish_rows(args.append, SECTION, INTRO, HEADER, [row])
  return dict(off=off, on=on, predicted=predicted, speedup=speedup)


if __name__ == "__main__":
  main()
