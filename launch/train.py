r"""Trains one InstructGPT stage: SFT, reward model or PPO(-ptx).

  python launch/train.py --config=configs/ppo.py --workdir=runs/demo
  python launch/train.py --config=configs/sft.py --config.optim.lr=1e-5 ...

Intentionally short: the logic lives in `rlhf_jax` where it is tested. Clusters: on a TPU pod
or under SLURM `jax.distributed` is initialised automatically; elsewhere pass
--coordinator_address/--num_processes/--process_id (see launch/*.sh).

Each process holds a lock in the workdir while it runs (`rlhf_jax.run_lock`): a second run
on a workdir a live run holds is refused. In a multi-process run, a process that fails
prints its error and leaves at once (`os._exit`), skipping JAX's shutdown barrier, so its
peers see it gone and fail too (`rlhf_jax.distributed`) instead of waiting.
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
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Multi-process runs: seconds after which a silent process is "
    "declared dead and the others exit (the bound on a lost process stalling the job).")
flags.mark_flags_as_required(["config", "workdir"])


def _user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file(argv):
  """The `--config=<file>[:arg]` of the command line, loaded; None if absent or broken."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return None
  import importlib.util
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # pylint: disable=broad-except  # reported by the normal parse below
    return None


def _print_help(argv) -> None:
  """absl's flags, then every config field of `--config=<file>` with default and comment."""
  from rlhf_jax import config_help
  print(flags.FLAGS.main_module_help())
  config = _config_file(argv)
  if config is None:
    print("\nGive --config=configs/<stage>.py to list its config fields.")
    return
  print("\nConfig fields (override any with --config.<field>=<value>):")
  print("\n".join("  " + line for line in config_help.field_lines(config)))


def _parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one line instead of a traceback.

  ml_collections raises a bare AttributeError / KeyError for an unknown `--config.a.b`
  field, and re-wraps a UserError raised while the config file builds itself.
  `--helpfull` / `--help` also list the config file's fields.
  """
  if any(a in ("--helpfull", "--help", "-h", "--helpshort") for a in argv[1:]):
    _print_help(argv)
    sys.exit(0)
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
    import re
    quoted = re.search(r"'([\w.-]+)\\?'", str(e))   # KeyError("'kl_cof'\nDid you mean...")
    key = quoted.group(1) if quoted else str(e).strip("\"'")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((o for o in overrides if key and key in o[len("--config."):].split(".")),
                   None)
    if isinstance(e, (AttributeError, KeyError)) and culprit:
      from rlhf_jax import config_help
      config = _config_file(argv)
      near = config_help.closest(config, culprit[len("--config."):]) if config else []
      hint = f"; did you mean {' or '.join('--config.' + n for n in near)}?" if near else ""
      _user_error(f"{culprit}: unknown config field {key!r}{hint} (`--config=<file> "
                  "--helpfull` lists the fields)")
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


def _lock_workdir(workdir: str):
  """Takes this process's workdir lock; every process of the run refuses if any could not."""
  import jax
  from rlhf_jax import distributed, run_lock
  index, count = jax.process_index(), jax.process_count()
  held = run_lock.try_acquire(workdir, index, count)
  if distributed.all_agree(held is not None):
    return held
  if held is None:
    raise run_lock.busy_error(workdir, run_lock.lock_path(workdir, index))
  held.release()
  raise run_lock.WorkdirBusy(f"--workdir={workdir} is in use by a live run (another process "
                             "of this run found its lock held; its error names the holder)")


def _fail(code: int, message: str) -> None:
  """Exits with `message`; in a multi-process run at once, without JAX's shutdown barrier
  (which would wait for peers that are stuck in a collective with this process)."""
  import jax
  print(message, file=sys.stderr, flush=True)
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


def main(argv):
  del argv
  from rlhf_jax import log_setup
  log_setup.configure()
  from rlhf_jax import distributed
  from rlhf_jax import run
  from rlhf_jax.errors import UserError
  try:
    distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value,
                                 heartbeat_timeout_seconds=_HEARTBEAT.value)
  except ValueError as e:
    _user_error(str(e))
  try:
    config = _config_or_exit()
    held = _lock_workdir(_WORKDIR.value)
    result = run.run(config, _WORKDIR.value, overridden=_overridden(sys.argv))
  except UserError as e:
    _fail(2, f"error: {e}")
  except Exception as e:  # pylint: disable=broad-except
    import jax
    if not (jax.distributed.is_initialized() and jax.process_count() > 1):
      raise
    import traceback
    traceback.print_exc()
    _fail(1, f"error: process {jax.process_index()} of {jax.process_count()} failed "
          f"({type(e).__name__}: {' '.join(str(e).split())[:500]}); if another process "
          "died first, its log has the cause; rerun the same command to resume from the "
          "last checkpoint")
  held.release()
  if result.get("preempted"):
    logging.info("preempted: checkpoint written; rerun the same command to resume")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
