"""Long rollouts with EOS on: decode steps run, compute spent on finished rows, tokens/s.

Called by `bench/ppo_iteration.py --generate-only --long-rollouts 256,512` after its no-EOS
measurement (same random-weight policy, same prompts, one process).

How rows are made to finish at different times with random weights: `sampling.generate`
takes a SET of stop ids. A random-weight model's next-token distribution is close to
uniform (GPT-2's init gives logits of std ~0.5), so with K stop ids each step ends a
still-live row with probability h ≈ K / V, independently: response lengths are geometric,
truncated at N. K is chosen so that the mean length is `--eos-mean` × N: for a hazard h,
E[min(L, N)] ≈ (1 - e^{-hN}) / h, so hN = x solves (1 - e^{-x}) / x = eos_mean (x ≈ 1.594
for a mean of N/2). The stop ids are the K highest ids (never the pad id 0). The lengths
actually drawn are measured and reported, not assumed.

What is reported per length N (median of the timed calls after a compile call; the same
key every call, so every timed call draws the same lengths and does the same work):
- decode steps: iterations of the decode `while_loop` = the longest row (the loop exits
  once every row has emitted a stop id, else after N steps);
- finished-row share: of the B × steps row-steps computed, the share spent on rows that had
  already finished (their outputs are discarded) = 1 - Σ lengths / (B × steps);
- useful tok/s = Σ lengths / call time; row-steps/s = B × steps / call time.
- the same with `sampling.generate(compact=K)` (`--compact`, default 2): call time, the
  row-steps it still computes (its own count), the speedup, and the rows whose tokens or
  masks differ from the plain loop's (expected 0).
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

import common

SECTION = ("## Long rollouts with EOS on: decode steps, finished-row share, tokens/s, "
           "with and without decode-batch compaction")
INTRO = """
`bench/ppo_iteration.py --generate-only --long-rollouts 256,512` (`bench/long_rollouts.py`):
one `sampling.generate` call per response length N with EOS on, random weights, the same
prompts as the no-EOS row, median of the timed calls after a compile call. Rows finish at
different times: K stop ids out of V give each step a ≈K/V chance of ending a live row
(a random-weight model's distribution is near uniform), K chosen for a mean length of
`--eos-mean` × N; the lengths drawn are measured. `steps` = decode-loop iterations (the
longest row; the loop exits when every row has stopped); `finished share` = row-steps
spent on rows already finished / all row-steps computed; `useful tok/s` counts tokens up
to and including each row's EOS. `compact k`: the same call with `sampling.generate(compact=k)`
(up to k halvings of the decode batch once half its rows have stopped), timed alternately
with the plain call; its finished share counts the row-steps it still computes; `rows
differing` counts rows whose tokens differ from the plain call's (expected 0).
"""
HEADER = ("| date | shape | dtype | batch | prompt | max new | stop ids K (target mean) | call s "
          "| decode steps | mean length (min–max) | finished share | useful tok/s "
          "| compact k | compact call s | compact finished share | compact useful tok/s "
          "| speedup | rows differing | compiles | machine, load | versions | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def hazard_x(mean_frac: float) -> float:
  """x = h·N with (1 - e^{-x}) / x = mean_frac (the truncated geometric's mean / N)."""
  if not 0.0 < mean_frac < 1.0:
    raise ValueError(f"long_rollouts: --eos-mean {mean_frac}, expected in (0, 1)")
  lo, hi = 1e-9, 1e6
  for _ in range(200):   # (1 - e^{-x}) / x decreases from 1 to 0: bisect
    mid = math.sqrt(lo * hi)
    if (1.0 - math.exp(-mid)) / mid > mean_frac:
      lo = mid
    else:
      hi = mid
  return math.sqrt(lo * hi)


def stop_ids(vocab_size: int, new_tokens: int, mean_frac: float) -> list[int]:
  """The K highest ids, K = round(x·V / N) clipped to [1, V - 2] (pad id 0 never stops)."""
  k = int(round(hazard_x(mean_frac) * vocab_size / new_tokens))
  k = min(max(k, 1), vocab_size - 2)
  return list(range(vocab_size - k, vocab_size))


def waste(mask) -> dict:
  """Decode steps, lengths and the finished-row share of a `GenerateOutput.mask` [B, N]."""
  m = np.asarray(mask)
  lengths = m.sum(axis=1)
  b = m.shape[0]
  steps = int(lengths.max())
  useful = int(lengths.sum())
  return dict(steps=steps, useful=useful, row_steps=b * steps,
              finished_share=1.0 - useful / (b * steps) if steps else 0.0,
              mean_len=float(lengths.mean()), min_len=int(lengths.min()),
              max_len=int(lengths.max()))


def run(cfg, params, prompt_batch, lengths, args, argv, script, dtype: str) -> list[dict]:
  """Times `sampling.generate` with EOS on for each N in `lengths`, with the plain decode loop
  and with `--compact` halvings of the decode batch (the two alternate, so load drift hits
  both alike); prints and appends rows."""
  import jax
  from rlhf_jax import sampling
  ids, mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
  b, p = ids.shape
  k = args.compact
  results, rows = [], []
  for n in lengths:
    stops = stop_ids(cfg.vocab_size, n, args.eos_mean)
    key = jax.random.key(1)
    call = lambda c: jax.block_until_ready(sampling.generate_with_row_steps(  # noqa: E731
        cfg, params, ids, mask, key, max_new_tokens=n, temperature=1.0, eos_id=stops,
        pad_id=0, compact=c))
    load0 = common.load()
    first = {}
    for c in (0, k):
      t0 = time.perf_counter()
      out, row_steps = call(c)
      first[c] = time.perf_counter() - t0
    times = {0: [], k: []}
    with common.CompileCounter() as cc:
      for _ in range(max(args.iterations, 1)):
        for c in (0, k):
          t0 = time.perf_counter()
          got, steps_c = call(c)
          times[c].append(time.perf_counter() - t0)
          if c == 0:
            out = got
          else:
            compact_out, row_steps = got, int(steps_c)
    # Rows whose tokens differ from the plain loop's: 0 unless a narrower matmul rounded a
    # logit across a sampling boundary (each row's noise is the same).
    differ = int(np.sum(np.any((np.asarray(out.tokens) != np.asarray(compact_out.tokens))
                               | (np.asarray(out.mask) != np.asarray(compact_out.mask)), axis=1)))
    sec, sec_c = statistics.median(times[0]), statistics.median(times[k])
    w = waste(out.mask)
    r = dict(new_tokens=n, stop_ids=len(stops), call_s=sec, compile_s=max(first[0] - sec, 0.0),
             useful_tps=w["useful"] / sec, row_steps_s=w["row_steps"] / sec,
             compiles=cc.count, compact=k, compact_call_s=sec_c,
             compact_compile_s=max(first[k] - sec_c, 0.0), compact_row_steps=row_steps,
             compact_finished_share=1.0 - w["useful"] / row_steps if row_steps else 0.0,
             compact_useful_tps=w["useful"] / sec_c, compact_speedup=sec / sec_c,
             compact_rows_differing=differ, **w)
    results.append(r)
    print(f"long rollout N={n}, EOS on ({len(stops)} stop ids, target mean "
          f"{args.eos_mean:.2f} N): {sec:.2f} s (runs {', '.join(f'{t:.2f}' for t in times[0])}); "
          f"decode steps {w['steps']} of {n}; lengths mean {w['mean_len']:.1f} "
          f"(min {w['min_len']}, max {w['max_len']}); finished-row share "
          f"{w['finished_share']:.1%}; useful {r['useful_tps']:.1f} tok/s, row-steps "
          f"{r['row_steps_s']:.1f}/s; compile ~{r['compile_s']:.1f} s; compiles after "
          f"warm-up {cc.count}", flush=True)
    print(f"  compact={k}: {sec_c:.2f} s (runs {', '.join(f'{t:.2f}' for t in times[k])}), "
          f"{sec / sec_c:.2f}x; row-steps {row_steps} of {w['row_steps']}, finished-row share "
          f"{r['compact_finished_share']:.1%}; useful {r['compact_useful_tps']:.1f} tok/s; "
          f"compile ~{r['compact_compile_s']:.1f} s; rows whose tokens differ: {differ}",
          flush=True)
    rows.append(
        f"| {common.today()} | {common.shape_cell(args.shape, cfg)} | {dtype} | {b} | {p} | {n} "
        f"| {len(stops)} ({args.eos_mean:.2f} N) | {sec:.2f} | {w['steps']} "
        f"| {w['mean_len']:.1f} ({w['min_len']}–{w['max_len']}) | {w['finished_share']:.1%} "
        f"| {r['useful_tps']:.1f} | {k} | {sec_c:.2f} | {r['compact_finished_share']:.1%} "
        f"| {r['compact_useful_tps']:.1f} | {sec / sec_c:.2f}× | {differ} | {cc.count} "
        + common.context_cells([load0, common.load()], argv, script))
  common.publish_rows(args.append, SECTION, INTRO, HEADER, rows)
  return results
