"""One process of the two-process loopback test (launched by tests/test_multihost.py).

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

Each process has 2 fake CPU devices; together they form a (4,1,1) mesh over 4 global
devices. Results are written to WORKDIR/result_<PROCESS_ID>.json for the parent to compare
against a single-process numpy reference.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import checkpoint, distributed, metrics, sharding

GLOBAL_ROWS, DIM, OUT = 8, 16, 4


def reference_data():
  """The global batch and weights every process (and the parent test) can rebuild."""
  rng = np.random.default_rng(0)
  return (rng.standard_normal((GLOBAL_ROWS, DIM), dtype=np.float32),
          rng.standard_normal((DIM, OUT), dtype=np.float32))


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
  logging.basicConfig(level=logging.WARNING)
  assert distributed.maybe_initialize(f"127.0.0.1:{port}", num_processes, process_id,
                                      initialization_timeout=30)
  assert distributed.maybe_initialize()          # idempotent
  assert jax.process_count() == num_processes and jax.process_index() == process_id
  assert jax.local_device_count() == 2 and jax.device_count() == 2 * num_processes
  assert distributed.is_main_process() == (process_id == 0)
  result: dict = {}

  # A global batch from each host's local rows, and a jitted sharded matmul + sum.
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  result["mesh"] = list(mesh.shape.values())
  x_global, w_np = reference_data()
  rows = GLOBAL_ROWS // num_processes
  local = x_global[process_id * rows:(process_id + 1) * rows]
  batch = sharding.host_to_global(mesh, {"x": local, "n": np.int32(GLOBAL_ROWS)})
  assert batch["x"].shape == (GLOBAL_ROWS, DIM)
  repl = sharding.replicated(mesh)
  w = jax.make_array_from_callback(w_np.shape, repl, lambda idx: w_np[idx])
  batch_sh = sharding.batch_sharding(mesh, 2)
  f = jax.jit(lambda b, w: (jnp.sum(b["x"] @ w) / b["n"], b["x"] @ w),
              in_shardings=({"x": batch_sh, "n": repl}, repl),
              out_shardings=(repl, batch_sh))
  mean, y = f(batch, w)
  result["mean"] = float(mean)
  result["y"] = np.asarray(multihost_utils.process_allgather(y, tiled=True)).tolist()

  # A mesh whose tensor axis spans the local devices: the batch splits over fsdp (hosts).
  mesh_ft = sharding.make_mesh(dict(data=1, fsdp=num_processes, tensor=-1))
  x_ft = sharding.host_to_global(mesh_ft, {"x": local})["x"]
  w_ft = jax.make_array_from_callback(
      w_np.shape, jax.sharding.NamedSharding(mesh_ft, jax.sharding.PartitionSpec(None, "tensor")),
      lambda idx: w_np[idx])
  y_ft = jax.jit(lambda x, w: x @ w, out_shardings=sharding.replicated(mesh_ft))(x_ft, w_ft)
  result["mesh_ft"] = list(mesh_ft.shape.values())
  result["y_ft"] = np.asarray(y_ft.addressable_data(0)).tolist()

  # Params born sharded over the 4 global devices, checkpointed into a shared dir.
  axes = {"w": ("batch", None), "step": None}
  init = lambda: {"w": jnp.arange(GLOBAL_ROWS * OUT, dtype=jnp.float32).reshape(
      GLOBAL_ROWS, OUT), "step": jnp.int32(7)}
  state = sharding.init_sharded(mesh, init, axes, sharding.DEFAULT_RULES)
  result["per_device_bytes"] = sharding.per_device_bytes(state["w"])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=3)
  ckpt.save(1, state, extra={"data": {"position": 1}})
  state2 = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1},
                   out_shardings=jax.tree.map(lambda a: a.sharding, state))(state)
  ckpt.save(2, state2, extra={"data": {"position": 2}})
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  restored, extra = ckpt.restore_latest(abstract)
  result["restored_extra"] = extra
  result["restored_step"] = int(restored["step"].addressable_data(0))
  result["restored_w"] = np.asarray(
      multihost_utils.process_allgather(restored["w"], tiled=True)).tolist()
  result["restored_spec"] = str(restored["w"].sharding.spec)

  # A damaged latest step: every process must fall back to the same older step.
  multihost_utils.sync_global_devices("before_corrupt")
  if process_id == 0:
    for root, _, files in os.walk(os.path.join(workdir, "ckpt", "2", "state")):
      for name in files:
        if name == "manifest.ocdbt":
          os.remove(os.path.join(root, name))
  multihost_utils.sync_global_devices("after_corrupt")
  fallback, extra = ckpt.restore_latest(abstract)
  result["fallback_extra"] = extra
  result["fallback_step"] = int(fallback["step"].addressable_data(0))
  result["steps_after_fallback"] = ckpt.all_steps()
  ckpt.close()

  # Metrics: only process 0 writes.
  with metrics.MetricsWriter(workdir, "mh") as writer:
    writer.write(1, {"mean": mean})
  result["writer_enabled"] = writer.enabled

  with open(os.path.join(workdir, f"result_{process_id}.json"), "w") as fh:
    json.dump(result, fh)
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 2)  # before any backend is initialised
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
