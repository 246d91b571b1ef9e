"""XLA's cost analysis of the PPO update (the train phase), against the harness's model FLOPs.

Compiles `trainers.ppo`'s jitted update for `--minibatches` minibatches of `--minibatch`
sequences (the parts `bench/ppo_iteration.py` builds, random weights, nothing run) and
prints `compiled.cost_analysis()` (flops, bytes accessed, transcendentals), the ratio of
XLA's flops to the model FLOPs `bench/common.py` counts (≈ 1.0: nothing recomputed; ≈ 1.33:
the forward is rematerialised), and the HLO's fusion / dot counts. The HLO text is written
to `--hlo` for a per-fusion look. Load-independent: runs on a busy box.

    python bench/train_cost.py --shape gpt2 --minibatch 8 --hlo /tmp/update_gpt2.hlo
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import ppo_iteration  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(common.PRESET_SHAPES), default="tiny")
  ap.add_argument("--minibatch", type=int, default=8, help="sequences per minibatch")
  ap.add_argument("--minibatches", type=int, default=1)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--hlo", metavar="PATH", help="write the compiled HLO text here")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from rlhf_jax import models, sharding
  from rlhf_jax.trainers import ppo

  b, p, n = args.minibatch * args.minibatches, args.prompt_len, args.new_tokens
  run_args = argparse.Namespace(batch=b, prompt_len=p, new_tokens=n, epochs=1,
                                minibatches=args.minibatches, iterations=1,
                                generate_only=False)
  cfg = models.get_preset(common.PRESET_SHAPES[args.shape], dtype="float32")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  captured = {}
  build = ppo.build

  def spy(*a, **k):   # keep the parts the harness's build makes (it returns a closure)
    captured["parts"] = build(*a, **k)
    return captured["parts"]
  ppo.build = spy
  try:
    state, *_ = ppo_iteration.build(cfg, run_args, mesh)
  finally:
    ppo.build = build
  parts = captured["parts"]
  exp_fn, update_fn = parts.fns(p)
  sds = jax.ShapeDtypeStruct
  exp = jax.eval_shape(exp_fn, state["policy"], parts.models.policy.params, state["value"],
                       parts.models.reward.params, state["kl_ctl"]["kl_coef"],
                       sds((b, p), jnp.int32), sds((b, p), jnp.int32), sds((b, n), jnp.int32),
                       sds((b, n), jnp.int32))[0]
  t0 = time.perf_counter()
  compiled = update_fn.lower(state, exp, jnp.zeros((args.minibatches,)),
                             jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  model = ppo_iteration.phase_flops(cfg, b, p, n, 1)["train"]
  text = compiled.as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(text)
  kinds = collections.Counter(re.findall(r"kind=k(\w+)", text))
  result = dict(shape=args.shape, minibatch=args.minibatch, minibatches=args.minibatches,
                compile_s=compile_s, xla_flops=cost.get("flops", 0.0),
                bytes_accessed=cost.get("bytes accessed", 0.0),
                transcendentals=cost.get("transcendentals", 0.0), model_flops=model,
                fusions=dict(kinds), dots=text.count(" dot("))
  print(f"{args.shape}, {args.minibatches} × {args.minibatch} × ({p}+{n}): compile "
        f"{compile_s:.0f} s; XLA {result['xla_flops'] / 1e9:.1f} GFLOP vs model "
        f"{model / 1e9:.1f} GFLOP ({result['xla_flops'] / model:.2f}×); bytes accessed "
        f"{result['bytes_accessed'] / 1e9:.2f} GB (intensity "
        f"{result['xla_flops'] / max(result['bytes_accessed'], 1):.0f} FLOP/B); "
        f"transcendentals {result['transcendentals'] / 1e6:.1f} M; fusions {dict(kinds)}, "
        f"dots {result['dots']}", flush=True)
  return result


if __name__ == "__main__":
  main()
