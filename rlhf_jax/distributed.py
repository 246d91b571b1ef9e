"""Multi-host start-up: plain `jax.distributed.initialize()`, no Pathways, no Ray.

Call `maybe_initialize(...)` first thing in a process, before anything touches a JAX
device (`jax.devices()`, creating an array, ...). It initializes the distributed runtime
when:

- an explicit coordinator is given (`--coordinator_address/--num_processes/--process_id`),
- the process runs as one of several SLURM tasks (inside `srun`),
- it runs under Open MPI with several ranks (`mpirun`),
- it runs on a Cloud TPU VM (JAX finds the pod's workers from the TPU metadata / env),

and is a no-op otherwise (a plain single-process run). On CPU, cross-process collectives
use gloo.

A lost process (SIGKILL, OOM, a node gone) stops the others: a collective it no longer
joins fails at once on the survivors (gloo: "Connection closed by peer"), and the
coordination service declares a process dead once it has sent no heartbeat for
`heartbeat_timeout_seconds` (100 s, JAX's default) and terminates every other
process ("the JAX distributed service detected fatal errors"); a survivor therefore exits
non-zero within that timeout even when it is not in a collective. A shorter timeout fails
faster but risks declaring a live process dead on a starved machine (seen at 60 s under a
load average of 70 on 2 cores). `launch/train.py` leaves
at once on an error in a multi-process run (`os._exit`) rather than waiting in JAX's
shutdown barrier for a peer that will never arrive.

`barrier`, `main_decides` and `all_agree` keep the processes in step where the code does
host-side work: one process writes a shared file, then all meet at a barrier before anyone
reads it; a decision taken from the filesystem ("is this stage done?") is process 0's, so
that no process skips a collective the others enter.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np

log = logging.getLogger("rlhf_jax")


def _int_env(name: str, default: int = 1) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def detect_cluster() -> Optional[str]:
  """The multi-process launcher this process runs under ("slurm", "ompi", "tpu"), or None."""
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID")  # what JAX's own SLURM detection needs (set by srun)
  if all(v in os.environ for v in slurm_vars) and _int_env("SLURM_NTASKS") > 1:
    return "slurm"
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if len([h for h in os.environ.get(var, "").split(",") if h.strip()]) > 1:
      return "tpu"
  if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  try:  # a Cloud TPU VM (single- or multi-host; JAX reads the worker list from metadata)
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
      return "tpu"
  except ImportError:
    pass
  return None


def maybe_initialize(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     local_device_ids: Optional[int | Sequence[int]] = None,
                     cpu_collectives: Optional[str] = "gloo",
                     initialization_timeout: int = 300,
                     heartbeat_timeout_seconds: int = 100) -> bool:
  """Initializes `jax.distributed` when running as one of several processes.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: restrict this process to these local devices (e.g. one GPU each).
    cpu_collectives: cross-process collectives on CPU ("gloo", "mpi"), or None to keep
      JAX's default.
    initialization_timeout: seconds to wait for all processes to connect.
    heartbeat_timeout_seconds: a process silent this long is declared dead and the others
      are terminated: the bound on how long a lost process can stall the job.

  Returns:
    True if the distributed runtime is (now) initialized, False for a single-process run.

  Raises:
    ValueError: explicit arguments that are incomplete or inconsistent.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = any(a is not None for a in (coordinator_address, num_processes, process_id,
                                         local_device_ids))
  cluster = None if explicit else detect_cluster()
  if not explicit and cluster is None:
    return False
  if explicit and coordinator_address is not None and (num_processes is None or
                                                       process_id is None):
    raise ValueError("coordinator_address needs num_processes and process_id too "
                     f"(got num_processes={num_processes}, process_id={process_id})")
  if heartbeat_timeout_seconds < 1:
    raise ValueError(f"heartbeat_timeout_seconds={heartbeat_timeout_seconds}: expected >= 1")
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"process_id={process_id}: expected 0 <= process_id < "
                     f"num_processes={num_processes}")
  if cpu_collectives:
    # Only affects the CPU client; harmless on GPU / TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  log.info("jax.distributed.initialize(%s)",
           f"coordinator={coordinator_address}, num_processes={num_processes}, "
           f"process_id={process_id}" if explicit else f"auto-detected {cluster}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  log.info("process %d of %d; a lost process stops the others within %d s (heartbeat "
           "timeout)", jax.process_index(), jax.process_count(), heartbeat_timeout_seconds)
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that writes metrics, logs and exports)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Returns once every process has called `barrier(name)` (no-op for one process).

  A device collective (`sync_global_devices`): a process that died fails it on the others
  (see the module docstring), so a barrier never outwaits a lost process.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def main_decides(flag: bool) -> bool:
  """Process 0's `flag`, on every process (a collective: all processes call it together).

  For choices read from the shared filesystem: a process that looked a moment later could
  see a file process 0 has just written, and take another path than its peers.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def all_agree(flag: bool) -> bool:
  """True iff `flag` is true on every process (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
