r"""Trains one InstructGPT stage: SFT, reward model or PPO(-ptx).

  python launch/train.py --config=configs/ppo.py --workdir=runs/demo
  python launch/train.py --config=configs/sft.py --config.optim.lr=1e-5 ...

Intentionally short: the logic lives in `rlhf_jax` where it is tested. Clusters: on a TPU pod
or under SLURM `jax.distributed` is initialised automatically; elsewhere pass
--coordinator_address/--num_processes/--process_id (see launch/*.sh).
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from rlhf_jax import log_setup
  log_setup.configure()
  from rlhf_jax import distributed
  from rlhf_jax.errors import UserError
  from rlhf_jax.trainers import dispatch
  try:
    distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
    result = dispatch.train(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.get("preempted"):
    logging.info("preempted: checkpoint written; rerun the same command to resume")


if __name__ == "__main__":
  app.run(main)
