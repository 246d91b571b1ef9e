"""Two processes over loopback (2 fake CPU devices each, gloo) behave like one with 4.

The worker (tests/multihost_worker.py) initialises through `distributed.maybe_initialize`,
builds a (4,1,1) mesh over the 4 global devices, feeds each host's slice of the batch with
`sharding.host_to_global`, runs a jitted sharded matmul, and saves / restores a sharded
checkpoint into a shared directory (including the damaged-latest fallback).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NUM_PROCESSES = 2
TIMEOUT_S = 60


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _reference():
  sys.path.insert(0, HERE)
  try:
    import multihost_worker  # only for its data; importing does not initialise anything
  finally:
    sys.path.remove(HERE)
  return multihost_worker.reference_data(), multihost_worker.GLOBAL_ROWS, multihost_worker.OUT


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  procs = []
  for pid in range(NUM_PROCESSES):
    log = open(workdir / f"log_{pid}.txt", "w")
    procs.append((subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(pid),
         str(NUM_PROCESSES), str(port), str(workdir)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  codes = []
  try:
    for proc, _ in procs:
      try:
        codes.append(proc.wait(timeout=TIMEOUT_S))
      except subprocess.TimeoutExpired:
        codes.append("timeout")
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  if codes != [0] * NUM_PROCESSES:
    logs = "\n".join(f"--- process {pid} ---\n" + (workdir / f"log_{pid}.txt").read_text()[-3000:]
                     for pid in range(NUM_PROCESSES))
    pytest.fail(f"worker exit codes {codes}\n{logs}")
  out = []
  for pid in range(NUM_PROCESSES):
    with open(workdir / f"result_{pid}.json") as f:
      out.append(json.load(f))
  return workdir, out


def test_sharded_compute_matches_single_process(results):
  _, out = results
  (x, w), rows, _ = _reference()
  y_ref = x.astype(np.float64) @ w.astype(np.float64)
  for r in out:
    assert r["mesh"] == [4, 1, 1]
    np.testing.assert_allclose(r["y"], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["mean"], y_ref.sum() / rows, rtol=1e-5, atol=1e-5)
    assert r["mesh_ft"] == [1, NUM_PROCESSES, 2]
    np.testing.assert_allclose(r["y_ft"], y_ref, rtol=1e-5, atol=1e-5)
  assert out[0]["mean"] == out[1]["mean"]


def test_checkpoint_save_restore_across_processes(results):
  _, out = results
  _, rows, cols = _reference()
  w0 = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
  for r in out:
    assert r["per_device_bytes"] == rows * cols * 4 // 4       # split over 4 devices
    assert r["restored_step"] == 8 and r["restored_extra"] == {"data": {"position": 2}}
    np.testing.assert_array_equal(r["restored_w"], w0 + 1)
    assert r["restored_spec"] == str(PartitionSpec(("data", "fsdp"), None))
    # Damaged latest: both processes fell back to step 1 together.
    assert r["fallback_step"] == 7 and r["fallback_extra"] == {"data": {"position": 1}}
    assert r["steps_after_fallback"] == [1]


def test_only_process_zero_writes_metrics(results):
  workdir, out = results
  assert [r["writer_enabled"] for r in out] == [True, False]
  from rlhf_jax import metrics
  records = metrics.read_metrics(workdir, "mh")
  assert len(records) == 1 and records[0]["mean"] == pytest.approx(out[0]["mean"])


# ------------------------------------------------ distributed.maybe_initialize, no cluster

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch):
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  return monkeypatch


def test_detect_cluster(clean_env):
  from rlhf_jax import distributed
  assert distributed.detect_cluster() is None
  slurm = dict(SLURM_JOB_ID="12", SLURM_STEP_NODELIST="node[1-2]", SLURM_PROCID="0",
               SLURM_LOCALID="0")
  for k, v in slurm.items():
    clean_env.setenv(k, v)
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.detect_cluster() is None        # a single SLURM task: no-op
  clean_env.setenv("SLURM_NTASKS", "2")
  assert distributed.detect_cluster() == "slurm"
  for k in slurm:
    clean_env.delenv(k)
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert distributed.detect_cluster() == "tpu"
  clean_env.delenv("TPU_WORKER_HOSTNAMES")
  clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
  assert distributed.detect_cluster() == "ompi"


def test_maybe_initialize_single_process_is_noop(clean_env):
  import jax
  from rlhf_jax import distributed
  assert distributed.maybe_initialize() is False
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()
  with pytest.raises(ValueError, match="process_id=2"):
    distributed.maybe_initialize("127.0.0.1:1", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    distributed.maybe_initialize("127.0.0.1:1")
  assert not jax.distributed.is_initialized()
