r"""Per-device memory of one PPO-ptx iteration (rollout, experience, update) on fake devices.

Nothing of the model is materialised: `trainers.ppo.build` runs on abstract params
(`jax.ShapeDtypeStruct`s carrying their shardings), the reward model is made a frozen
compute-dtype copy as `ppo.load_models` does, and the iteration's three jitted pieces are
lowered and compiled for N fake CPU devices:

  generate     `sampling.generate`'s jitted loop on the trained policy (prefill + decode)
  experience   `parts.fns(P)[0]`: policy / reference log-probs, values, RM scores, GAE
  update       `parts.fns(P)[1]`: epochs x minibatches of policy + value + ptx gradients
               (the state donated, as the trainer calls it)

XLA's compiled memory analysis gives each piece's per-device arguments, outputs, aliased
(donated) bytes and temporaries. What stays live between the pieces (the state: policy and
value masters + Adam moments; the reference and reward model) is live during each of them
whether passed in or not, so each phase's peak is

  resident (state + reference + RM) - the resident bytes it takes as arguments
  + arguments + outputs - aliased + temporaries

and the iteration's peak is the largest phase. The model is compiled with `--layers` layers
(default: two depths, 2 and 4; one layer is a special case the CPU compiler fuses
differently, so fit from 2 up); every figure is then extrapolated linearly to the preset's
depth (the params, moments, KV cache and saved activations grow by layer) and the per-layer
slope is printed, so the extrapolation can be checked. `--layers=full` compiles all of them.

  .venv/bin/python bench/ppo_memory.py --preset=llama-8b --meshes=fsdp=8
  .venv/bin/python bench/ppo_memory.py --preset=llama-70b --meshes=fsdp=64
  .venv/bin/python bench/ppo_memory.py --preset=tiny --batch=16 --minibatches=2 \
      --prompt_len=8 --new_tokens=8 --ptx_batch=4 --layers=1,2 --meshes="fsdp=4"  # quick

Two settings make the CPU figures mean something for an accelerator. XLA CPU's default
concurrency-optimised scheduler starts every layer's FSDP all-gather at once, so its
temporaries hold the whole gathered model (measured: they grow by every layer's weights);
this benchmark switches it off (`--xla_cpu_enable_concurrency_optimized_scheduler=false`,
`--concurrency_scheduler` keeps it), and the memory-minimising scheduler then gathers layer
by layer as TPU / GPU schedulers do (temporaries flat in the depth). `--no_batch_constraint`
turns off the model's batch constraint (`transformer.constrain_batch`), to show what it buys. Arguments (params,
moments, batch) are exact; temporaries remain the CPU compiler's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="llama-8b")
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  ap.add_argument("--no_remat", action="store_true", help="remat is on by default")
  ap.add_argument("--batch", type=int, default=512, help="rollout prompts per iteration")
  ap.add_argument("--minibatches", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=512)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--ptx_batch", type=int, default=64, help="ptx sequences per minibatch")
  ap.add_argument("--ptx_len", type=int, default=0, help="0: prompt_len + new_tokens")
  ap.add_argument("--layers", default="2,4",
                  help="compiled depths, comma-separated; two or more: linear fit to the "
                  "preset's depth; 'full': the preset's own")
  ap.add_argument("--meshes", default="fsdp=8;fsdp=4,tensor=2",
                  help="';'-separated meshes, each 'axis=size,...'")
  ap.add_argument("--phases", default="generate,experience,update")
  ap.add_argument("--concurrency_scheduler", action="store_true",
                  help="keep XLA CPU's default concurrency-optimised scheduler (it hoists "
                  "every layer's FSDP all-gather to the start: temporaries then hold the "
                  "whole gathered model); off by default: the memory-minimising scheduler")
  ap.add_argument("--no_batch_constraint", action="store_true",
                  help="turn off the model's batch constraint on the residual stream "
                  "(`transformer.constrain_batch`) to see what it buys")
  return ap.parse_args(argv)


def _meshes(text: str) -> list:
  return [{k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
          for spec in text.split(";")]


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.concurrency_scheduler:   # read when the backend starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_enable_concurrency_optimized_scheduler=false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

if ARGS is not None:   # as many fake devices as the largest mesh, before any backend starts
  jax.config.update("jax_num_cpu_devices",
                    max(math.prod(m.values()) for m in _meshes(ARGS.meshes)))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import config as config_lib  # noqa: E402
from rlhf_jax import models, sampling, sharding  # noqa: E402
from rlhf_jax import workdir as workdir_lib  # noqa: E402
from rlhf_jax.trainers import model_init, ppo  # noqa: E402
from rlhf_jax.trainers import state as state_lib  # noqa: E402

GIB = 2.0 ** 30


def device_bytes(tree) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return total


def _without_batch_constraint() -> None:
  """Turns off the model's batch constraint (`transformer.constrain_batch`), to show what
  it buys: under fsdp the lookup `take(embedding [V, D], ids [B, T])` meets the fsdp axis
  twice (the table's D and the ids' B) and XLA's propagation keeps B whole, so without the
  constraint every activation is computed for the whole global batch on every device
  (1-layer Llama-8B experience on fsdp=8: 210 GiB of temporaries without, 25.5 GiB with).
  """
  from rlhf_jax.models import transformer
  transformer.constrain_batch = lambda x, mesh: x


def abstract_model(mesh, cfg, kind: str) -> model_init.Model:
  params = models.abstract_params(cfg, kind)
  shardings = state_lib.model_shardings(mesh, cfg, kind, sharding.DEFAULT_RULES, shapes=params)
  return model_init.Model(cfg, state_lib.abstract_with_shardings(params, shardings), shardings)


def ppo_config(args):
  c = config_lib.ppo_config()
  c.model.dtype = args.dtype
  c.train.batch_size = args.batch
  p = c.ppo
  p.minibatches, p.epochs, p.max_new_tokens = args.minibatches, 1, args.new_tokens
  p.ptx_batch_size, p.ptx_coef, p.iterations = args.ptx_batch, 1.0, 1000
  return c


def build(args, cfg, mesh):
  """`ppo.build` on abstract policy / value / reward models, as `ppo.load_models` holds them."""
  c = ppo_config(args)
  policy = abstract_model(mesh, cfg, "causal")
  value = abstract_model(mesh, cfg, "scalar")
  reward = model_init.frozen(abstract_model(mesh, cfg, "scalar"))   # as load_models does
  eos = cfg.eos_token_id if cfg.eos_token_id is not None else 1
  m = ppo.Models(policy=policy, value=value, reward=reward,
                 normalization=dict(workdir_lib.NO_NORMALIZATION), eos_id=eos, pad_id=0,
                 stop_ids=(eos,))
  return ppo.build(c, mesh, m, use_ptx=True)


def _tokens(mesh, shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def _analyse(lowered) -> dict:
  t0 = time.perf_counter()
  mem = lowered.compile().memory_analysis()
  return dict(args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes,
              alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
              compile_s=time.perf_counter() - t0)


def measure(args, cfg, mesh_shape: dict) -> dict:
  """Per-device bytes of each phase of one PPO-ptx iteration (see the module docstring)."""
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(
      list(mesh_shape.values())))])
  if args.no_batch_constraint:
    _without_batch_constraint()
  parts = build(args, cfg, mesh)
  state = parts.abstract_state()
  ref, rm = parts.models.policy.params, parts.models.reward.params
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  repl = sharding.replicated(mesh)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=repl)  # noqa: E731
  sizes = dict(policy=device_bytes(state["policy"]), policy_opt=device_bytes(state["policy_opt"]),
               value=device_bytes(state["value"]), value_opt=device_bytes(state["value_opt"]),
               reference=device_bytes(ref), reward=device_bytes(rm))
  resident = device_bytes(state) + sizes["reference"] + sizes["reward"]
  prompts = _tokens(mesh, (B, P))
  tokens = _tokens(mesh, (B, N))
  exp_fn, update_fn = parts.fns(P)
  phases, want = {}, args.phases.split(",")
  if "generate" in want:
    lowered = sampling._generate.lower(   # what `sampling.generate` calls, shapes only
        parts.models.policy.cfg, state["policy"], prompts, prompts,
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl), scalar(jnp.float32),
        scalar(jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32, sharding=repl),
        scalar(jnp.int32), max_new_tokens=N, top_k=0, greedy=False, use_top_p=False)
    phases["generate"] = dict(_analyse(lowered), resident_args=sizes["policy"])
  exp_args = (state["policy"], ref, state["value"], rm, state["kl_ctl"]["kl_coef"], prompts,
              prompts, tokens, tokens)
  if "experience" in want:
    phases["experience"] = dict(_analyse(exp_fn.lower(*exp_args)), resident_args=(
        sizes["policy"] + sizes["reference"] + sizes["value"] + sizes["reward"]))
  if "update" in want:
    exp = jax.tree.map(lambda x: _tokens(mesh, x.shape, x.dtype),
                       jax.eval_shape(exp_fn, *exp_args)[0])
    T = args.ptx_len or P + N
    ptx = {k: _tokens(mesh, (args.minibatches * args.ptx_batch, T))
           for k in ("input_ids", "attention_mask", "loss_mask")}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
    frozen = parts.frozen()   # LoRA's frozen bases; None (no argument) without LoRA
    lowered = update_fn.lower(state, exp, ptx, key, *(() if frozen is None else (frozen,)))
    phases["update"] = dict(_analyse(lowered), resident_args=device_bytes(state))
  for r in phases.values():
    r["peak"] = resident - r["resident_args"] + r["args"] + r["out"] - r["alias"] + r["temp"]
  return dict(sizes=sizes, resident=resident, phases=phases)


def _fit(depths: list, rows: list, full: int):
  """Each number of `rows` (one dict per depth, same keys) fitted linearly in the depth:
  (value at `full` layers, per-layer slope)."""
  def walk(xs):
    if isinstance(xs[0], dict):
      return {k: walk([x[k] for x in xs]) for k in xs[0]}
    if len(xs) == 1:
      return (xs[0], 0.0)
    slope, icpt = np.polyfit(np.asarray(depths, float), np.asarray(xs, float), 1)
    return (icpt + slope * full, slope)
  return walk(rows)


def _g(pair) -> str:
  return f"{pair[0] / GIB:.1f}"


def main(args=None):
  args = args or ARGS
  base = models.get_preset(args.preset).replace(dtype=args.dtype, remat=not args.no_remat)
  full = base.num_layers
  depths = [full] if args.layers == "full" else [int(x) for x in args.layers.split(",")]
  n = models.param_count(models.abstract_params(base, "causal"))
  print(f"{args.preset}: {n / 1e9:.3f}B params, {full} layers (compiled at {depths}, "
        f"extrapolated linearly), compute {args.dtype}, remat={not args.no_remat}; rollout "
        f"{args.batch} prompts x ({args.prompt_len} + {args.new_tokens}) tokens, "
        f"{args.minibatches} minibatches of {args.batch // args.minibatches}, 1 epoch, ptx "
        f"{args.ptx_batch} x {args.ptx_len or args.prompt_len + args.new_tokens} tokens per "
        f"minibatch; batch constraint (transformer.constrain_batch): "
        f"{not args.no_batch_constraint}; XLA CPU scheduler: "
        f"{'concurrency' if args.concurrency_scheduler else 'memory'}; {jax.device_count()} fake {jax.devices()[0].platform} devices; "
        f"jax {jax.__version__}", flush=True)
  for shape in _meshes(args.meshes):
    rows = []
    for depth in depths:
      r = measure(args, base.replace(num_layers=depth), shape)
      rows.append(r)
      print(f"  {shape} at {depth} layers: " + ", ".join(
          f"{k} peak {v['peak'] / GIB:.2f} GiB (temp {v['temp'] / GIB:.2f}, "
          f"compile {v['compile_s']:.0f} s)" for k, v in r["phases"].items()), flush=True)
    fit = _fit(depths, [dict(sizes=r["sizes"], resident=r["resident"],
                             phases={k: {f: v[f] for f in ("temp", "peak", "args", "out")}
                                     for k, v in r["phases"].items()}) for r in rows], full)
    mesh = ",".join(f"{k}={v}" for k, v in shape.items())
    s, ph = fit["sizes"], fit["phases"]
    peak_phase = max(ph, key=lambda k: ph[k]["peak"][0])
    print(f"| {args.preset} | {mesh} | {_g(s['policy'])} + {_g(s['policy_opt'])} | "
          f"{_g(s['value'])} + {_g(s['value_opt'])} | {_g(s['reference'])} | "
          f"{_g(s['reward'])} | {_g(fit['resident'])} | " +
          " | ".join(f"{_g(ph[k]['temp'])}" if k in ph else "-"
                     for k in ("generate", "experience", "update")) +
          f" | **{_g(ph[peak_phase]['peak'])}** ({peak_phase}) |", flush=True)
    print("  per layer (GiB): resident {:.3f}; ".format(fit["resident"][1] / GIB) + ", ".join(
        f"{k} temp {v['temp'][1] / GIB:.3f} peak {v['peak'][1] / GIB:.3f}"
        for k, v in ph.items()), flush=True)


if __name__ == "__main__":
  main()
