"""One live run per workdir: a lock file that process i of a run holds while it runs.

Two runs writing one workdir corrupt each other's orbax checkpoints and metrics (seen when a
killed run's process outlived its shell and a rerun started beside it). `launch/train.py`
therefore has every process `acquire` `<workdir>/.lock/process-<i>` before training and keep
it until it exits; a run that finds one of its locks held is refused with the holder's
host, pid, process index and start time.

The lock is an advisory `fcntl.flock` on that file, so the operating system releases it
when its holder dies however it dies (SIGKILL, OOM): a dead run never blocks a rerun, and
there is no pid file to judge stale. On NFS, Linux maps `flock` to a byte-range lock that
the server sees (v4, or v3 with lockd); a lost client's lock lapses with its lease.

    held = run_lock.acquire(workdir, process_index=0, process_count=2)  # or WorkdirBusy
    ...                                                                # until exit
    held.release()
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Optional

from rlhf_jax.errors import UserError

LOCK_DIR = ".lock"


class WorkdirBusy(UserError):
  """The workdir is held by a live run."""


def lock_path(workdir: str, process_index: int) -> str:
  return os.path.join(workdir, LOCK_DIR, f"process-{process_index}")


class Held:
  """A held lock: its open file (the lock lives as long as this descriptor)."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def holder(path: str) -> Optional[dict]:
  """What the holder wrote into the lock file (host, pid, process, started), if readable."""
  try:
    with open(path) as f:
      return json.loads(f.read() or "null")
  except (OSError, ValueError):
    return None


def describe(path: str) -> str:
  info = holder(path)
  if not info:
    return f"lock file {path}"
  return (f"process {info.get('process')} of {info.get('processes')}, pid {info.get('pid')} "
          f"on host {info.get('host')}, started {info.get('started')}; lock file {path}")


def try_acquire(workdir: str, process_index: int = 0,
                process_count: int = 1) -> Optional[Held]:
  """Takes `<workdir>/.lock/process-<i>` without waiting; None if a live process holds it."""
  path = lock_path(workdir, process_index)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  # Ours now: record who holds it, for the message a refused run prints.
  info = dict(host=socket.gethostname(), pid=os.getpid(), process=process_index,
              processes=process_count,
              started=datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M:%S UTC"))
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  return Held(path, fd)


def busy_error(workdir: str, path: str) -> WorkdirBusy:
  return WorkdirBusy(
      f"--workdir={workdir} is in use by a live run ({describe(path)}); two runs on one "
      "workdir would corrupt each other's checkpoints: wait for it to finish, stop it, or "
      "choose another --workdir")


def acquire(workdir: str, process_index: int = 0, process_count: int = 1) -> Held:
  """`try_acquire`, raising `WorkdirBusy` (a UserError naming the holder) when held."""
  held = try_acquire(workdir, process_index, process_count)
  if held is None:
    raise busy_error(workdir, lock_path(workdir, process_index))
  return held
