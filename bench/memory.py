r"""Per-device memory of a ~1B-parameter Llama SFT train step: fsdp=8 vs data=8.

Nothing of the 1B model is materialised: the train state and batch are ShapeDtypeStructs
that carry their shardings, the trainer's own jitted step (`sft.build` on abstract params:
the explicit in/out shardings and donation the SFT stage uses) is lowered and compiled for 8
fake CPU devices, and XLA's compiled memory analysis reports the per-device buffers:

    arguments (state + batch shard) + outputs − aliased (donated state) + temporaries

  .venv/bin/python bench/memory.py                        # llama-1b, bf16 compute, B=8, T=1024
  .venv/bin/python bench/memory.py --remat --seq_len=2048
  .venv/bin/python bench/memory.py --preset=tiny --batch=8 --seq_len=64   # a quick check

The CPU compiler's buffer assignment and fusion differ from TPU/GPU, so temporaries are
indicative; the argument / output sizes (params, Adam moments, batch) are exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)   # before any backend is initialised

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import config as config_lib  # noqa: E402
from rlhf_jax import models, sharding  # noqa: E402
from rlhf_jax.trainers import model_init, sft  # noqa: E402
from rlhf_jax.trainers import state as state_lib  # noqa: E402

GIB = 2.0 ** 30


def abstract_parts(cfg, mesh, batch: int, seq_len: int, grad_accum: int):
  """The SFT stage's parts on abstract params, and its (state, batch) as ShapeDtypeStructs."""
  abstract_params = models.abstract_params(cfg, "causal")
  p_shard = state_lib.model_shardings(mesh, cfg, "causal", sharding.DEFAULT_RULES,
                                      shapes=abstract_params)
  conf = config_lib.sft_config()
  conf.train.batch_size, conf.train.grad_accum = batch, grad_accum
  parts = sft.build(conf, mesh, model_init.Model(cfg, abstract_params, p_shard), 1000)
  state = parts.abstract_state()
  b_shard = sharding.batch_sharding(mesh, 2)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=b_shard)
  return parts, state, dict(input_ids=tokens, attention_mask=tokens, loss_mask=tokens)


def measure(cfg, mesh_shape: dict, batch: int, seq_len: int, grad_accum: int) -> dict:
  mesh = sharding.make_mesh(mesh_shape)
  parts, state, batch_in = abstract_parts(cfg, mesh, batch, seq_len, grad_accum)
  shardings = parts.shardings
  t0 = time.perf_counter()
  compiled = parts.step_fn.lower(state, batch_in).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  per_device_state = 0
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    per_device_state += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return dict(mesh=dict(mesh.shape), state=per_device_state, args=mem.argument_size_in_bytes,
              out=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
              temp=mem.temp_size_in_bytes, peak=peak, compile_s=seconds)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="llama-1b")
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--grad_accum", type=int, default=1)
  ap.add_argument("--meshes", default="fsdp=8;data=8",
                  help="';'-separated meshes, each 'axis=size,...'")
  args = ap.parse_args(argv)
  cfg = models.get_preset(args.preset).replace(dtype=args.dtype, remat=args.remat)
  n = models.param_count(models.abstract_params(cfg, "causal"))
  print(f"{args.preset}: {n / 1e9:.3f}B params ({n * 4 / GIB:.2f} GiB fp32), compute "
        f"{args.dtype}, remat={args.remat}, global batch {args.batch} x {args.seq_len} "
        f"tokens, grad_accum {args.grad_accum}, {jax.device_count()} {jax.devices()[0].platform}"
        " devices")
  print("| mesh | state / device (params + Adam) | arguments | outputs | aliased (donated) | "
        "temporaries | peak / device |")
  print("|---|---|---|---|---|---|---|")
  for spec in args.meshes.split(";"):
    shape = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    r = measure(cfg, shape, args.batch, args.seq_len, args.grad_accum)
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(f"| {mesh} | {r['state'] / GIB:.2f} GiB | {r['args'] / GIB:.2f} GiB | "
          f"{r['out'] / GIB:.2f} GiB | {r['alias'] / GIB:.2f} GiB | {r['temp'] / GIB:.2f} GiB | "
          f"**{r['peak'] / GIB:.2f} GiB** |", flush=True)


if __name__ == "__main__":
  main()
