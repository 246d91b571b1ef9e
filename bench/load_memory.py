r"""Peak host RSS of loading a ~1B Llama HF checkpoint: host `load_hf` vs the sharded loader.

Makes a Llama-3.2-1B-shaped checkpoint on disk (preset llama-1b: 1.24B params, tied
embeddings; random bfloat16 weights written straight to safetensors files of <= 1 GiB plus
model.safetensors.index.json, no torch model in RAM), then loads it

  (a) with `models.load_hf` in one process (every tensor on the host as float32), and
  (b) with `models.load_hf_sharded` in 2 processes x 4 fake CPU devices, mesh fsdp=8
      (jax.distributed on loopback, gloo), each process reading only its devices' slices,
      then streams it back out with `models.save_hf` (one tensor gathered at a time).

and reports each process's peak RSS (`ru_maxrss`) next to its RSS before loading (JAX
imported and initialised). On CPU the "device" buffers are host RAM, so (b)'s peak is the
process's float32 share of the model plus the loader's working set.

  .venv/bin/python bench/load_memory.py                          # 1B: make, (a), (b)
  .venv/bin/python bench/load_memory.py --preset=tiny --dir=/tmp/lm  # a quick check

`--role=worker` is one process of (b) (the harness starts two; tests/test_hf_sharded_load.py
too, on a tiny checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

GIB = 1024**3


def _rss_now() -> int:
  """Current resident set size in bytes (/proc/self/statm)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_checkpoint(out_dir: str, preset: str, max_file_bytes: int = GIB, seed: int = 0,
                    **overrides) -> dict:
  """Writes a random bfloat16 checkpoint of `preset` (config.json, safetensors + index);
  `overrides` replace ModelConfig fields (e.g. num_layers=1 for a quick test)."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  from rlhf_jax import models
  from rlhf_jax.models import hf, hf_config
  cfg = models.get_preset(preset).replace(**overrides)
  os.makedirs(out_dir, exist_ok=True)
  hf_config.to_hf_config(cfg, "causal").save_pretrained(out_dir)
  abstract = models.abstract_params(cfg, "causal")
  rng = np.random.default_rng(seed)
  # Stored shapes from our shapes through the same transforms save_hf uses (zero-stride
  # stand-ins: no memory).
  shapes = []
  for name, paths, _, to_hf in hf._entries(cfg, "causal"):  # pylint: disable=protected-access
    stand_ins = [np.broadcast_to(np.zeros((), np.float32), hf._get(abstract, p).shape)  # pylint: disable=protected-access
                 for p in paths]
    shapes.append((name, tuple(to_hf(stand_ins).shape)))
  sizes = [2 * int(np.prod(s)) for _, s in shapes]
  files = hf._plan_files(sizes, max_file_bytes)  # pylint: disable=protected-access
  count = files[-1] + 1
  names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
  weight_map, pending = {}, {}
  for i, (name, shape) in enumerate(shapes):
    scale = 1.0 if name.endswith("norm.weight") else 0.02
    pending[name] = (rng.standard_normal(shape, np.float32) * scale).astype(ml_dtypes.bfloat16)
    weight_map[name] = names[files[i]]
    if i + 1 == len(shapes) or files[i + 1] != files[i]:
      save_file(pending, os.path.join(out_dir, names[files[i]]), metadata={"format": "pt"})
      pending = {}
  with open(os.path.join(out_dir, hf.INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
  return dict(params=sum(s // 2 for s in sizes), disk_bytes=sum(sizes), files=count)


def role_host(ckpt: str) -> dict:
  """(a): `load_hf` in this process."""
  import jax
  from rlhf_jax import models
  jax.devices()
  before = _rss_now()
  t0 = time.perf_counter()
  cfg, params = models.load_hf(ckpt)
  jax.block_until_ready(params)
  return dict(role="host load_hf", before=before, peak=_peak_rss(),
              seconds=time.perf_counter() - t0, params=models.param_count(params))


def role_worker(ckpt: str, coordinator: str, num_processes: int, process_id: int,
                save: str = "", max_file_bytes: int = GIB) -> dict:
  """(b): one process: sharded load onto mesh fsdp=all devices, then a streamed save."""
  import jax
  from rlhf_jax import distributed, models, sharding
  from rlhf_jax.trainers import state as state_lib
  distributed.maybe_initialize(coordinator, num_processes, process_id)
  mesh = sharding.make_mesh({"fsdp": -1})
  before = _rss_now()
  t0 = time.perf_counter()
  cfg, _, params = models.load_hf_sharded(
      ckpt, lambda c, k: state_lib.model_shardings(mesh, c, k, sharding.DEFAULT_RULES))
  jax.block_until_ready(params)
  out = dict(role=f"sharded, process {process_id}/{num_processes}", before=before,
             peak_load=_peak_rss(), seconds=time.perf_counter() - t0,
             params=models.param_count(params), devices=len(jax.devices()),
             local_bytes=sum(s.data.nbytes for x in jax.tree.leaves(params)
                             for s in x.addressable_shards))
  if save:
    t0 = time.perf_counter()
    models.save_hf(cfg, params, save, max_file_bytes=max_file_bytes)
    out.update(peak_save=_peak_rss(), save_seconds=time.perf_counter() - t0)
  out["peak"] = _peak_rss()
  return out


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(ckpt: str, processes: int = 2, devices: int = 4, save: str = "",
                max_file_bytes: int = GIB, timeout: int = 1200) -> list:
  """Starts (b) as `processes` processes of `devices` fake CPU devices; their JSON results."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  procs = []
  logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]
  for pid, log in enumerate(logs):
    cmd = [sys.executable, os.path.abspath(__file__), "--role=worker", f"--ckpt={ckpt}",
           f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
           f"--process_id={pid}", f"--max_file_bytes={max_file_bytes}"]
    if save:
      cmd.append(f"--save={save}")
    # Output to files, not pipes: a full pipe nobody drains would block its process in the
    # middle of a collective, and with it every other process.
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
  results = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=timeout)
      log.seek(0)
      out = log.read()
      if p.returncode != 0:
        raise RuntimeError(f"worker exited {p.returncode}:\n{out[-4000:]}")
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  return results


def _run_self(role: str, ckpt: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--role={role}",
                        f"--ckpt={ckpt}"], env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(out.stderr[-4000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--role", default="all", choices=["all", "make", "host", "worker"])
  ap.add_argument("--preset", default="llama-1b")
  ap.add_argument("--dir", default="/tmp/rlhf_jax_load_memory")
  ap.add_argument("--ckpt", default="", help="the checkpoint (default: <dir>/ckpt)")
  ap.add_argument("--save", default="", help="worker: stream the loaded model out here")
  ap.add_argument("--max_file_bytes", type=int, default=GIB)
  ap.add_argument("--coordinator", default="")
  ap.add_argument("--num_processes", type=int, default=2)
  ap.add_argument("--process_id", type=int, default=0)
  args = ap.parse_args()
  ckpt = args.ckpt or os.path.join(args.dir, "ckpt")
  if args.role == "make":
    print(json.dumps(make_checkpoint(ckpt, args.preset, args.max_file_bytes)))
    return
  if args.role == "host":
    print(json.dumps(role_host(ckpt)))
    return
  if args.role == "worker":
    print(json.dumps(role_worker(ckpt, args.coordinator, args.num_processes, args.process_id,
                                 args.save, args.max_file_bytes)))
    return
  if not os.path.exists(os.path.join(ckpt, "config.json")):
    made = make_checkpoint(ckpt, args.preset, args.max_file_bytes)
  else:
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
      made = dict(disk_bytes=json.load(f)["metadata"]["total_size"])
  host = _run_self("host", ckpt)
  workers = run_workers(ckpt, save=os.path.join(args.dir, "export"),
                        max_file_bytes=args.max_file_bytes)
  f32 = 4 * host["params"]
  print(f"# {args.preset}: {host['params'] / 1e9:.3f}B params, {made['disk_bytes'] / GIB:.2f} "
        f"GiB bf16 on disk, {f32 / GIB:.2f} GiB as float32")
  header = ("| load | process | RSS before (GiB) | peak RSS (GiB) | peak / float32 model | "
            "local shards (GiB) | seconds |\n|---|---|---|---|---|---|---|\n")
  rows = [f"| host `load_hf` | 1 of 1 | {host['before'] / GIB:.2f} | {host['peak'] / GIB:.2f} "
          f"| {host['peak'] / f32:.2f} | - | {host['seconds']:.1f} |"]
  for w in workers:
    rows.append(f"| `load_hf_sharded` fsdp=8 (+ streamed `save_hf`) | {w['role'].split()[-1]} "
                f"| {w['before'] / GIB:.2f} | {w['peak_load'] / GIB:.2f} "
                f"({w['peak'] / GIB:.2f} after save) | {w['peak_load'] / f32:.2f} "
                f"| {w['local_bytes'] / GIB:.2f} | {w['seconds']:.1f} "
                f"(save {w.get('save_seconds', 0):.1f}) |")
  print(header + "\n".join(rows))


if __name__ == "__main__":
  main()
