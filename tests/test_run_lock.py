"""One live run per workdir (`rlhf_jax.run_lock`, taken by `launch/train.py`).

The unit tests hold the lock in a separate Python process (as a run would): while it lives,
the lock is refused with a message naming its pid and host; once it is SIGKILLed the kernel
has released its flock and a rerun takes the lock at once. The launcher test starts two runs
on one workdir: the second is refused with exit status 2 and one `error:` line naming the
first, which then finishes normally.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import command_helpers
import helpers
from rlhf_jax import run_lock

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from rlhf_jax import run_lock
held = run_lock.acquire({workdir!r}, {index}, 2)
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir: str, index: int = 0) -> subprocess.Popen:
  """A Python process that takes the lock of process `index` and sleeps holding it."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(
      repo=helpers.REPO, workdir=workdir, index=index)], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_live_holder_refuses_and_a_sigkilled_one_does_not_block(tmp_path):
  workdir = str(tmp_path / "w")
  proc = _holder(workdir)
  try:
    assert run_lock.try_acquire(workdir, 0, 2) is None
    with pytest.raises(run_lock.WorkdirBusy) as err:
      run_lock.acquire(workdir, 0, 2)
    message = str(err.value)
    assert f"--workdir={workdir} is in use by a live run" in message
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message
    assert "process 0 of 2" in message and run_lock.lock_path(workdir, 0) in message
    # Another process index of the same workdir is a different lock.
    other = run_lock.acquire(workdir, 1, 2)
    other.release()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The holder died without releasing anything; its lock file is still there.
  assert os.path.isfile(run_lock.lock_path(workdir, 0))
  held = run_lock.acquire(workdir, 0, 1)
  assert run_lock.holder(held.path)["pid"] == os.getpid()
  held.release()
  again = run_lock.acquire(workdir, 0, 1)   # a released lock is free too
  again.release()


def test_one_process_cannot_take_a_lock_twice(tmp_path):
  """flock locks belong to an open file: a second open in the same process is refused."""
  held = run_lock.acquire(str(tmp_path), 0, 1)
  try:
    assert run_lock.try_acquire(str(tmp_path), 0, 1) is None
  finally:
    held.release()


def _sft_args(tmp_path) -> list:
  base = helpers.tiny_hf_llama(str(tmp_path / "base"))
  rows = helpers.write_jsonl(str(tmp_path / "sft.jsonl"), helpers.copy_rows(32))
  return ["--config.task=", f"--config.model.init_from={base}",
          f"--config.data.train.path={rows}", "--config.train.steps=4",
          "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.data.max_prompt_len=8", "--config.data.max_len=16"]


def test_a_second_run_on_a_live_runs_workdir_is_refused(tmp_path):
  pytest.importorskip("torch", reason="torch makes the tiny HF checkpoint (test extra)")
  workdir = str(tmp_path / "run")
  args = _sft_args(tmp_path)
  first = subprocess.Popen(helpers.launcher_cmd("configs/sft.py", workdir, *args),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=helpers.launcher_env(), cwd=helpers.REPO)
  lock = run_lock.lock_path(workdir, 0)
  deadline = time.monotonic() + 180
  while (run_lock.holder(lock) or {}).get("pid") != first.pid:
    assert first.poll() is None, first.stderr.read()[-3000:]
    assert time.monotonic() < deadline, "the first run never took its lock"
    time.sleep(0.05)
  # Frozen while the second run starts, so that it is surely still live (and holding).
  first.send_signal(signal.SIGSTOP)
  try:
    second = command_helpers.run_command("train.py", f"--config={helpers.REPO}/configs/sft.py",
                                         f"--workdir={workdir}", *args, timeout=180)
  finally:
    first.send_signal(signal.SIGCONT)
  line = command_helpers.error_line(second)
  assert f"--workdir={workdir} is in use by a live run" in line, line
  assert f"pid {first.pid} on host {socket.gethostname()}" in line, line
  _, err = first.communicate(timeout=240)
  assert first.returncode == 0, err[-5000:]
  assert os.path.isfile(os.path.join(workdir, "export", "policy", "config.json"))
  assert len(helpers.read_metrics(workdir)) >= 4
