"""Issue 18 item 4: can the sampler's log-probs stand in for PPO's "old" log-probs?

`sampling.generate` already returns, for every sampled token, float32 log-softmax of
`logits / temperature` at the chosen token (`GenerateOutput.logprobs`; PPO's config keeps
top-k / top-p off, so that is the unfiltered distribution). The experience recomputes the
same quantity with a full forward of the policy over prompt + response
(`objectives.response_logprobs`). This script measures, for a random-weight policy:

- the max |sampler − scoring| log-prob over the generated tokens (mask 1), in the given
  dtype: the KV-cache decode and the full causal forward differ only in summation order
  (and, in bfloat16, in where roundings happen);
- the time of that one scoring forward (jitted `response_logprobs` at the PPO batch), and
  its share of the experience phase's model FLOPs (policy + reference forwards with the
  LM head on the N response positions, value + reward forwards): the most that reusing the
  sampler's log-probs can save per iteration.

    python bench/sampler_logprobs.py --shape gpt2 --batch 32 --prompt-len 64 --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(common.PRESET_SHAPES), default="tiny")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--timing", action="store_true", help="also time one scoring forward")
  common.add_ppo_shape_args(ap)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlhf_jax import models, objectives, sampling

  cfg = models.get_preset(common.PRESET_SHAPES[args.shape], dtype=args.dtype)
  params = models.init(cfg, jax.random.key(0), kind="causal")
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  rs = np.random.RandomState(0)
  ids = jnp.asarray(rs.randint(1, cfg.vocab_size - 1, size=(B, P)), jnp.int32)
  mask = jnp.ones((B, P), jnp.int32)
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(1), max_new_tokens=N,
                          temperature=args.temperature, eos_id=None, pad_id=0)
  full_ids = jnp.concatenate([ids, out.tokens], axis=1)
  full_mask = jnp.concatenate([mask, out.mask], axis=1)
  score = jax.jit(lambda p, i, m: objectives.response_logprobs(cfg, p, i, m, P,
                                                               args.temperature))
  ref = score(params, full_ids, full_mask)
  m = np.asarray(out.mask) > 0
  diff = np.abs(np.asarray(out.logprobs) - np.asarray(ref))[m]
  rel = diff / np.maximum(np.abs(np.asarray(ref))[m], 1e-12)
  result = dict(shape=args.shape, dtype=args.dtype, batch=B, prompt_len=P, new_tokens=N,
                temperature=args.temperature, tokens=int(m.sum()),
                max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                max_rel=float(rel.max()), mean_logprob=float(np.asarray(ref)[m].mean()))
  print(f"{args.shape} {args.dtype}, B {B}, P {P}, N {N}, T {args.temperature}: sampler vs "
        f"scoring log-probs over {result['tokens']} tokens: max |diff| "
        f"{result['max_abs']:.3g}, mean {result['mean_abs']:.3g}, max rel "
        f"{result['max_rel']:.3g} (mean log-prob {result['mean_logprob']:.2f})", flush=True)

  s = P + N
  policy_fwd = common.forward_flops(cfg, B * s, s, lm_head=True, head_tokens=B * N)
  scalar_fwd = common.forward_flops(cfg, B * s, s, lm_head=False)
  share = policy_fwd / (2 * policy_fwd + 2 * scalar_fwd)
  result["score_flop_share"] = share
  print(f"one policy forward = {share:.1%} of the experience phase's model FLOPs "
        f"({policy_fwd / 1e9:.1f} of {(2 * policy_fwd + 2 * scalar_fwd) / 1e9:.1f} GFLOP)",
        flush=True)
  if args.timing:
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(score(params, full_ids, full_mask))
      times.append(time.perf_counter() - t0)
    result["forward_s"] = statistics.median(times)
    print(f"one scoring forward (jitted response_logprobs): {result['forward_s']:.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in times)}), load {common.load():.1f}",
          flush=True)
  return result


if __name__ == "__main__":
  main()
