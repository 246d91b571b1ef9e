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


def _user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one line instead of a traceback.

  ml_collections raises a bare AttributeError / KeyError for an unknown `--config.a.b`
  field, and re-wraps a UserError raised while the config file builds itself.
  """
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # every parse error is the user's
    from rlhf_jax.errors import UserError
    chain, cause = [], e
    while cause is not None and cause not in chain:
      chain.append(cause)
      cause = cause.__cause__ or cause.__context__
    user = next((c for c in chain if isinstance(c, UserError)), None)
    if user is not None:
      _user_error(str(user))
    if isinstance(e, flags.Error):
      _user_error(f"{str(e).splitlines()[0]} (--helpfull lists the flags)")
    key = str(e).strip("\"'")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((o for o in overrides if key and key in o[len("--config."):].split(".")),
                   None)
    if isinstance(e, (AttributeError, KeyError)) and culprit:
      _user_error(f"{culprit}: unknown config field {key!r}; `--config=<file> --helpfull` "
                  "lists the fields")
    _user_error(f"could not load the config ({type(e).__name__}: {' '.join(str(e).split())})")


def _config_or_exit():
  """The parsed config; a config file that failed to load is reported in one line."""
  try:
    config = _CONFIG.value
    config.get("stage")  # ml_collections defers a missing file's IOError to first access
    return config
  except OSError as e:
    _user_error(" ".join(str(e).split()))


def _overridden(argv) -> tuple:
  """The config fields set on the command line (`--config.a.b=v` -> "a.b")."""
  return tuple(a.split("=", 1)[0][len("--config."):] for a in argv
               if a.startswith("--config."))


def main(argv):
  del argv
  from rlhf_jax import log_setup
  log_setup.configure()
  from rlhf_jax import distributed
  from rlhf_jax import run
  from rlhf_jax.errors import UserError
  try:
    distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
    result = run.run(_config_or_exit(), _WORKDIR.value, overridden=_overridden(sys.argv))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.get("preempted"):
    logging.info("preempted: checkpoint written; rerun the same command to resume")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
