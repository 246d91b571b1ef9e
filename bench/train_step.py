"""SFT and RM train-step throughput and MFU against this machine's measured matmul peak.

Uses the trainers' own `build` (`trainers.sft.build`, `trainers.rm.build`: the state and the
jitted step with its shardings and donated state) on a 1-device mesh. Random weights, random
token ids; the SFT batch masks the first `--prompt-len` tokens out of the loss; the RM
batch is `--batch / 2` prompts × K = 2 responses of `--seq` tokens (so both stages push
`--batch × --seq` tokens through the model per step).

    python bench/train_step.py --shape gpt2 --batch 32 --seq 128 --steps 3
    python bench/train_step.py --shape tiny --steps 20 --append docs/benchmarks.md

The matmul peak (a jitted f32 [n,n]@[n,n], best of 5) is measured in the same process before
the first stage and again after each stage's steps; each stage's MFU uses the higher of the
measurements around it, so a busier moment of this shared machine cannot inflate MFU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SECTION = "## Train step: SFT and RM tokens/s and MFU"
INTRO = """
`bench/train_step.py`: one optimiser step of `trainers.sft.make_train_step` /
`trainers.rm.make_train_step` (AdamW + global-norm clip, NaN guard), jitted with the
state's shardings and `donate_argnums=(0,)` by the trainers' `build`, on a 1-device mesh;
random weights and ids. tokens/s = batch × seq / median step time (after one compile step).
MFU = model FLOPs (6 × matmul params × tokens + attention QK/PV fwd+bwd, see
`bench/common.py`) / step time / the matmul peak measured in the same run (`jnp.dot` of
two [n,n] matrices in the compute dtype, f32 or bf16, best of 5). `compiles after warm-up`
counts XLA backend compilations during the timed steps (must be 0). RM rows: batch/2 prompts × K=2.
"""
HEADER = ("| date | shape | stage | dtype | batch × seq | step s (median) | tokens/s | "
          "model TFLOP/step | matmul peak GFLOP/s | MFU | compile s | compiles after warm-up | "
          "machine, load | versions | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

SHAPES = common.PRESET_SHAPES


def sft_batch(rs, cfg, batch: int, seq: int, prompt_len: int):
  import numpy as np
  ids = rs.randint(1, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  loss_mask = np.ones((batch, seq), np.int32)
  loss_mask[:, :prompt_len] = 0
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)


def rm_batch(rs, cfg, batch: int, seq: int, k: int = 2):
  import numpy as np
  b = batch // k
  ids = rs.randint(1, cfg.vocab_size, size=(b, k, seq)).astype(np.int32)
  return dict(input_ids=ids, attention_mask=np.ones((b, k, seq), np.int32),
              last_index=np.full((b, k), seq - 1, np.int32),
              ranks=np.tile(np.arange(k, dtype=np.int32), (b, 1)),
              valid=np.ones((b, k), bool))


def build_step(stage: str, cfg, mesh, total_steps: int, grad_accum: int):
  """(fresh train state, jitted step) from the trainer's own `build` (random weights)."""
  import jax
  from rlhf_jax import config as config_lib
  from rlhf_jax import models
  from rlhf_jax.trainers import model_init
  from rlhf_jax.trainers import rm as rm_lib
  from rlhf_jax.trainers import sft as sft_lib
  from rlhf_jax.trainers import state as state_lib

  kind = "causal" if stage == "sft" else "scalar"
  conf = config_lib.sft_config() if stage == "sft" else config_lib.rm_config()
  conf.train.grad_accum = grad_accum
  p_shard = state_lib.model_shardings(mesh, cfg, kind, state_lib.parse_rules(""))
  params = jax.jit(lambda: models.init(cfg, jax.random.key(0), kind=kind),
                   out_shardings=p_shard)()
  trainer = sft_lib if stage == "sft" else rm_lib
  parts = trainer.build(conf, mesh, model_init.Model(cfg, params, p_shard), total_steps)
  return parts.init_state(), parts.step_fn


def run_stage(stage: str, cfg, args, mesh, peak: float) -> dict:
  import jax
  import numpy as np
  from rlhf_jax import sharding

  state, step_fn = build_step(stage, cfg, mesh, args.steps + 1, args.grad_accum)
  rs = np.random.RandomState(0)
  make = (lambda: sft_batch(rs, cfg, args.batch, args.seq, args.prompt_len)) if stage == "sft" \
      else (lambda: rm_batch(rs, cfg, args.batch, args.seq))
  batches = [sharding.host_to_global(mesh, make()) for _ in range(min(args.steps, 4))]

  t0 = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  times = []
  with common.CompileCounter() as cc:
    for i in range(args.steps):
      t0 = time.perf_counter()
      state, m = step_fn(state, batches[i % len(batches)])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  # The box is shared: re-measure the peak right after this stage's steps and keep the
  # higher of the two (a peak measured at a busier moment would inflate MFU).
  peak = max(peak, common.matmul_peak_flops(args.peak_n, dtype=_peak_dtype(args)))
  step_s = statistics.median(times)
  tokens = args.batch * args.seq
  # SFT: the LM head runs on every position (the loss reads T-1 of them); RM: scalar head.
  flops = common.train_flops(cfg, tokens, args.seq, lm_head=(stage == "sft"))
  return dict(stage=stage, step_s=step_s, times=times, tokens_s=tokens / step_s, peak=peak,
              flops=flops, mfu=flops / step_s / peak, compile_s=max(first - step_s, 0.0),
              compiles=cc.count, loss=float(m["loss"]), cache_size=step_fn._cache_size())


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
  ap.add_argument("--stages", default="sft,rm")
  ap.add_argument("--batch", type=int, default=32, help="sequences per step (issue: 32)")
  ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (64 + 64)")
  ap.add_argument("--prompt-len", type=int, default=64, help="SFT: tokens masked from the loss")
  ap.add_argument("--grad-accum", type=int, default=1)
  ap.add_argument("--steps", type=int, default=5, help="timed steps after the compile step")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak")
  ap.add_argument("--append", metavar="MD", help="append rows to this markdown file")
  ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
  args = ap.parse_args(argv)

  import jax
  from rlhf_jax import models, sharding

  cfg = models.get_preset(SHAPES[args.shape], dtype=args.dtype, remat=args.remat)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  load_start = common.load()
  peak = common.matmul_peak_flops(args.peak_n,
                                  dtype="bfloat16" if args.dtype == "bfloat16" else "float32")
  print(f"# {args.shape}: {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s ({args.dtype}); load {load_start:.2f}",
        flush=True)
  results, rows = [], []
  for stage in args.stages.split(","):
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else _null():
      r = run_stage(stage, cfg, args, mesh, peak)
    results.append(r)
    print(f"{stage}: step {r['step_s']:.3f} s (runs {', '.join(f'{t:.3f}' for t in r['times'])}), "
          f"{r['tokens_s']:.0f} tok/s, {r['flops'] / 1e12:.3f} TFLOP/step, MFU {r['mfu']:.1%}, "
          f"compile {r['compile_s']:.1f} s, compiles after warm-up {r['compiles']}, "
          f"jit cache {r['cache_size']}, loss {r['loss']:.3f}", flush=True)
  context = common.context_cells([load_start, common.load()], argv, __file__)
  for r in results:
    rows.append(
        f"| {common.today()} | {common.shape_cell(args.shape, cfg)} "
        f"| {r['stage']} | {args.dtype}{' remat' if args.remat else ''} | {args.batch} × {args.seq} "
        f"| {r['step_s']:.3f} | {r['tokens_s']:.0f} | {r['flops'] / 1e12:.3f} "
        f"| {r['peak'] / 1e9:.1f} | {r['mfu']:.1%} | {r['compile_s']:.1f} | {r['compiles']} "
        + context)
  common.publish_rows(args.append, SECTION, INTRO, HEADER, rows)
  if args.json:
    import json
    with open(args.json, "w") as f:
      json.dump(dict(shape=args.shape, dtype=args.dtype, batch=args.batch, seq=args.seq,
                     results=results), f, indent=1, default=float)
  return results


def _peak_dtype(args) -> str:
  return "bfloat16" if args.dtype == "bfloat16" else "float32"


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


if __name__ == "__main__":
  main()
