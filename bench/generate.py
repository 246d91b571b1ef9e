"""Generated tokens/s: `rlhf_jax.sampling.generate` vs transformers' PyTorch `generate`.

Both sides use the same random weights (a transformers model made with `from_config`,
saved with `save_pretrained`, loaded with `models.load_hf`), the same prompts (random ids,
no padding), the same number of new tokens, and no EOS (every row generates every token).
Compile time is excluded from JAX's tokens/s (a warm-up call runs first) and reported on its
own; torch gets a short warm-up call (it has nothing to compile) and runs with `--torch-threads` (default: all cores).

    # the issue's target shape: GPT-2 small, batch 16, prompt 64, 128 new tokens
    python bench/generate.py --shape gpt2-small --batch 16 --prompt-len 64 --new-tokens 128
    # a Llama-3.2-1B-shaped model
    python bench/generate.py --shape llama-1b --batch 4 --prompt-len 64 --new-tokens 32
    # add --append docs/benchmarks.md to record the row (date, machine, versions, command)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAPES = {
    # GPT-2 small: 12 x 768, vocab 50257.
    "gpt2-small": dict(family="gpt2", layers=12, hidden=768, heads=12, kv_heads=12,
                       intermediate=3072, vocab=50257, max_pos=1024),
    # Llama-3.2-1B dims (16 x 2048, GQA 32/8, SwiGLU 8192, vocab 128256, tied embeddings).
    "llama-1b": dict(family="llama", layers=16, hidden=2048, heads=32, kv_heads=8,
                     intermediate=8192, vocab=128256, max_pos=2048, tie=True, rope_theta=5e5),
    # A seconds-sized shape for smoke-testing this script.
    "tiny": dict(family="llama", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128,
                 vocab=512, max_pos=512),
}

SECTION = "## Sampling: `sampling.generate` vs transformers `generate`"
TABLE_HEADER = (
    "| date | shape | batch | prompt | new | mode | JAX tok/s | torch tok/s | JAX / torch | "
    "JAX compile s | machine, load | versions | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
SECTION_INTRO = """
Generated tokens per second (batch × new tokens / wall time of one `generate` call, median
of `--repeats` calls after a warm-up call) for `rlhf_jax.sampling.generate` and
transformers' PyTorch `model.generate`, same random weights, same prompts (random ids, no
padding), EOS disabled so every row generates every token, float32 on both sides. JAX
compile time (first call minus a steady call) is reported separately and not counted.
torch runs with each thread count in `--torch-threads` and the fastest is reported (the
shared CI/dev box is often loaded, and torch's OpenMP threads degrade badly when cores are
oversubscribed); `load a→b` is the 1-minute load average at the start / end of the run.
Rows are appended by `bench/generate.py --append docs/benchmarks.md`.

"""


def hf_config(shape: dict, transformers):
  common = dict(vocab_size=shape["vocab"], pad_token_id=0, bos_token_id=None, eos_token_id=None)
  if shape["family"] == "gpt2":
    return transformers.GPT2Config(n_embd=shape["hidden"], n_layer=shape["layers"],
                                   n_head=shape["heads"], n_inner=shape["intermediate"],
                                   n_positions=shape["max_pos"], **common)
  return transformers.LlamaConfig(
      hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
      num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["max_pos"],
      tie_word_embeddings=shape.get("tie", False), rope_theta=shape.get("rope_theta", 1e4),
      **common)


def time_calls(fn, repeats: int) -> tuple[float, list[float]]:
  """Returns (first call seconds, [steady call seconds])."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    runs.append(time.perf_counter() - t0)
  return first, runs


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
  ap.add_argument("--layers", type=int, help="override the shape's number of layers")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--mode", choices=["greedy", "sample"], default="greedy",
                  help="sample = temperature 1, no top-k/top-p on both sides")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch-threads", default=str(os.cpu_count()),
                  help="comma-separated torch thread counts to try; the fastest is reported")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--append", metavar="MD", help="append the markdown row to this file")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from rlhf_jax import models, sampling

  shape = dict(SHAPES[args.shape])
  if args.layers:
    shape["layers"] = args.layers
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  greedy = args.mode == "greedy"

  t0 = time.perf_counter()
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(hf_config(shape, transformers),
                                                     dtype=torch.float32).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    cfg, params = models.load_hf(tmp)
  params = jax.device_put(params)
  n_params = sum(x.numel() for x in hf.parameters())
  print(f"# {args.shape}: {n_params / 1e6:.1f}M params, cfg.dtype={cfg.dtype}; "
        f"setup {time.perf_counter() - t0:.1f}s", flush=True)

  rs = np.random.RandomState(0)
  ids_np = rs.randint(1, shape["vocab"], size=(b, p)).astype(np.int32)
  mask_np = np.ones((b, p), np.int32)
  ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
  key = jax.random.key(0)

  def run_jax():
    out = sampling.generate(cfg, params, ids, mask, key, n, greedy=greedy)
    jax.block_until_ready(out)
    return out

  first, runs = time_calls(run_jax, args.repeats)
  jax_s = statistics.median(runs)
  compile_s = max(first - jax_s, 0.0)
  out = run_jax()
  assert int(np.asarray(out.mask).sum()) == b * n, "a row stopped early"
  jax_tps = b * n / jax_s
  print(f"jax:   {jax_tps:9.1f} tok/s  (runs {', '.join(f'{r:.2f}' for r in runs)} s; "
        f"first call {first:.1f} s, compile ~{compile_s:.1f} s)", flush=True)

  torch_tps, torch_threads = float("nan"), None
  load_start = common.load()
  if not args.skip_torch:
    t_ids, t_mask = torch.from_numpy(ids_np).long(), torch.from_numpy(mask_np).long()
    gen_kwargs = dict(max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    if greedy:
      gen_kwargs.update(do_sample=False)
    else:
      gen_kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    last = {}

    def run_torch(**overrides):
      with torch.inference_mode():
        o = hf.generate(input_ids=t_ids, attention_mask=t_mask, **{**gen_kwargs, **overrides})
      last["tokens"] = o[:, p:].numpy()
      return o

    for threads in [int(t) for t in args.torch_threads.split(",")]:
      torch.set_num_threads(threads)
      run_torch(max_new_tokens=2, min_new_tokens=2)   # warm-up (a short one: no compile here)
      truns = [time_calls(run_torch, 0)[0] for _ in range(args.repeats)]
      assert last["tokens"].shape == (b, n), last["tokens"].shape
      tps = b * n / statistics.median(truns)
      print(f"torch: {tps:9.1f} tok/s  (runs {', '.join(f'{r:.2f}' for r in truns)} s; "
            f"{threads} threads)", flush=True)
      if not tps <= torch_tps:   # nan on the first pass
        torch_tps, torch_threads = tps, threads
    if greedy:
      same = (last["tokens"] == np.asarray(out.tokens)).mean()
      print(f"# greedy tokens identical to torch: {same:.1%}")

  ratio = jax_tps / torch_tps
  shape_name = args.shape + (f" ({shape['layers']} layers)" if args.layers else "")
  row = (f"| {common.today()} | {shape_name} | {b} | {p} | {n} | "
         f"{args.mode} | {jax_tps:.1f} | {torch_tps:.1f} ({torch_threads} thr) | {ratio:.2f}× | "
         f"{compile_s:.1f} "
         + common.context_cells([load_start, common.load()], argv, __file__,
                                f", torch {torch.__version__}"))
  common.publish_rows(args.append, SECTION, SECTION_INTRO, TABLE_HEADER, [row])


if __name__ == "__main__":
  main()
