"""Exact resume, preemption and a corrupted latest checkpoint, through the real launcher.

Each test runs `launch/train.py` in subprocesses and signals them as a scheduler or a crash
would. The oracle is an uninterrupted run of the same command: a run SIGKILLed after its
first checkpoint (and after metrics past that checkpoint were written) and restarted must
end with the same metrics.jsonl values (wall-clock keys aside) and bit-identical exported
params. PPO covers sampler rng, prompt + ptx data positions, the adaptive KL controller and
the EMA policy, and the `ppo.kl_warn` / `ppo.score_warn` alarms.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import helpers

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints (test extra)")

RUN_TIMEOUT = 240


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  rows = helpers.copy_rows(64)
  out = dict(base=helpers.tiny_hf_llama(str(d / "base")))
  out["sft"] = helpers.write_jsonl(str(d / "sft.jsonl"), rows)
  out["prompts"] = helpers.write_jsonl(str(d / "prompts.jsonl"),
                                       [dict(prompt=r["prompt"]) for r in rows])
  out["text"] = helpers.write_jsonl(str(d / "text.jsonl"),
                                    [dict(text=r["prompt"] + " " + r["completion"])
                                     for r in rows])
  out["pairs"] = helpers.write_jsonl(str(d / "pairs.jsonl"), [
      dict(prompt=r["prompt"], chosen="good " + r["completion"],
           rejected="bad " + r["completion"]) for r in rows])
  return out


def sft_args(f, steps=24):
  return ["configs/sft.py", "--config.task=", f"--config.model.init_from={f['base']}",
          f"--config.data.train.path={f['sft']}", f"--config.data.eval.path={f['sft']}",
          f"--config.train.steps={steps}", "--config.train.batch_size=8",
          "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.eval_every=4", "--config.train.eval_batches=1",
          "--config.data.max_prompt_len=8", "--config.data.max_len=16",
          "--config.optim.lr=3e-3", "--config.optim.warmup_steps=2"]


def rm_args(f):
  return ["configs/rm.py", "--config.task=", f"--config.model.init_from={f['base']}",
          f"--config.data.train.path={f['pairs']}", f"--config.data.eval.path={f['pairs']}",
          f"--config.data.norm.path={f['sft']}", "--config.train.steps=16",
          "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.ckpt_every=2", "--config.train.eval_every=4",
          "--config.train.eval_batches=1", "--config.data.max_prompt_len=8",
          "--config.data.max_len=16", "--config.optim.lr=3e-3"]


def ppo_args(f):
  # reward_from = a causal LM: the RM / value model get a seeded fresh head (deterministic).
  return ["configs/ppo.py", "--config.task=", f"--config.model.init_from={f['base']}",
          f"--config.ppo.reward_from={f['base']}", f"--config.data.train.path={f['prompts']}",
          f"--config.data.eval.path={f['prompts']}", f"--config.data.ptx.path={f['text']}",
          "--config.ppo.ptx_coef=0.5", "--config.ppo.ptx_batch_size=2",
          "--config.ppo.ema_decay=0.9", "--config.ppo.kl_controller=adaptive",
          "--config.ppo.kl_target=0.01", "--config.ppo.kl_horizon=50",
          "--config.ppo.kl_warn=1e-9", "--config.ppo.score_warn=1e-9",
          "--config.ppo.iterations=10", "--config.train.batch_size=8",
          "--config.ppo.minibatches=2", "--config.ppo.max_new_tokens=4",
          "--config.data.max_prompt_len=8", "--config.data.max_len=16",
          "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.eval_every=4", "--config.train.eval_batches=1",
          "--config.optim.lr=3e-3"]


class Run:
  """One launcher subprocess (same command line and env as `helpers.run_launcher`)."""

  def __init__(self, workdir: str, config: str, *overrides: str):
    self.workdir = workdir
    env = helpers.launcher_env()
    cmd = helpers.launcher_cmd(config, workdir, *overrides)
    self._err_path = workdir.rstrip("/") + f".stderr.{time.monotonic_ns()}"
    self._err = open(self._err_path, "w")
    self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err,
                                 cwd=helpers.REPO, env=env)

  def wait(self, timeout=RUN_TIMEOUT) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise
    finally:
      self._err.close()

  @property
  def stderr(self) -> str:
    with open(self._err_path) as f:
      return f.read()

  def ok(self):
    rc = self.wait()
    assert rc == 0, f"rc={rc}\n{self.stderr[-5000:]}"
    return self


def _metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # a line being written right now
  return out


def _ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_until(run: Run, predicate, timeout=RUN_TIMEOUT, what=""):
  """Polls every 10 ms until `predicate()`; fails if the run exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if run.proc.poll() is not None:
      pytest.fail(f"run exited (rc={run.proc.returncode}) before {what}:\n{run.stderr[-4000:]}")
    time.sleep(0.01)
  run.proc.kill()
  pytest.fail(f"timed out waiting for {what}")


def past_first_checkpoint(workdir):
  """A checkpoint exists and metrics were written after it (so they must be truncated)."""
  def pred():
    steps = _ckpt_steps(workdir)
    return bool(steps) and any(r.get("step", 0) > steps[0] for r in _metrics(workdir))
  return pred


TIMING = ("time", "steps_per_sec", "tokens_per_sec")


def comparable(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time_")}
          for r in _metrics(workdir)]


def assert_same_metrics(ref_dir, other_dir):
  ref, other = comparable(ref_dir), comparable(other_dir)
  assert [(r["step"], sorted(r)) for r in other] == [(r["step"], sorted(r)) for r in ref]
  for a, b in zip(ref, other):
    assert a == b, (a, b)


def assert_same_export(ref_dir, other_dir, name):
  from safetensors.numpy import load_file
  a = load_file(os.path.join(ref_dir, "export", name, "model.safetensors"))
  b = load_file(os.path.join(other_dir, "export", name, "model.safetensors"))
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def kill_and_resume(tmp_path, args, tag):
  """Uninterrupted run || (run, SIGKILL after its first checkpoint, rerun): both workdirs."""
  ref_dir, cut_dir = str(tmp_path / f"{tag}_ref"), str(tmp_path / f"{tag}_cut")
  ref = Run(ref_dir, *args)
  cut = Run(cut_dir, *args)
  wait_until(cut, past_first_checkpoint(cut_dir), what="the first checkpoint")
  cut.proc.send_signal(signal.SIGKILL)
  assert cut.wait() == -signal.SIGKILL
  steps_at_kill, logged_at_kill = _ckpt_steps(cut_dir), max(r["step"] for r in _metrics(cut_dir))
  assert not os.path.isdir(os.path.join(cut_dir, "export")), "killed too late: run finished"
  again = Run(cut_dir, *args).ok()
  assert f"resumed from {os.path.join(cut_dir, 'checkpoints')} at step" in again.stderr
  ref.ok()
  assert logged_at_kill > steps_at_kill[0]
  return ref_dir, cut_dir, ref


# ---------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def sft_ref(files, tmp_path_factory):
  """The uninterrupted SFT run, started once and shared (it runs while tests start theirs)."""
  workdir = str(tmp_path_factory.mktemp("sft_ref") / "w")
  return Run(workdir, *sft_args(files))


def test_sft_sigkill_resume_is_exact(files, sft_ref, tmp_path):
  args = sft_args(files)
  cut_dir = str(tmp_path / "cut")
  cut = Run(cut_dir, *args)
  wait_until(cut, past_first_checkpoint(cut_dir), what="the first checkpoint")
  cut.proc.send_signal(signal.SIGKILL)
  assert cut.wait() == -signal.SIGKILL
  assert not os.path.isdir(os.path.join(cut_dir, "export")), "killed too late: run finished"
  Run(cut_dir, *args).ok()
  sft_ref.ok()
  assert_same_metrics(sft_ref.workdir, cut_dir)
  assert_same_export(sft_ref.workdir, cut_dir, "policy")
  # Rerunning a finished run changes nothing: no duplicated final eval line, same export.
  before = comparable(cut_dir)
  again = Run(cut_dir, *args).ok()
  assert "resumed from" in again.stderr
  assert comparable(cut_dir) == before
  assert sum(1 for r in before if r["step"] == 24 and "eval/loss" in r) == 1
  assert_same_export(sft_ref.workdir, cut_dir, "policy")


def test_rm_sigkill_resume_is_exact(files, tmp_path):
  ref_dir, cut_dir, _ = kill_and_resume(tmp_path, rm_args(files), "rm")
  assert_same_metrics(ref_dir, cut_dir)
  assert any("eval/accuracy" in r for r in comparable(ref_dir))
  assert_same_export(ref_dir, cut_dir, "reward_model")
  norm = [json.load(open(os.path.join(d, "export", "reward_model",
                                      "reward_normalization.json")))
          for d in (ref_dir, cut_dir)]
  assert norm[0] == norm[1]


def test_ppo_sigkill_resume_is_exact_with_ema_adaptive_kl_ptx_and_alarms(files, tmp_path):
  ref_dir, cut_dir, ref = kill_and_resume(tmp_path, ppo_args(files), "ppo")
  assert_same_metrics(ref_dir, cut_dir)
  assert_same_export(ref_dir, cut_dir, "policy")   # the EMA policy (ppo.ema_decay > 0)
  rows = [r for r in comparable(ref_dir) if "score" in r]
  assert len(rows) == 10
  # The adaptive controller moved β (so its state really was carried across the kill) and
  # the ptx term was on.
  assert len({r["kl_coef"] for r in rows}) > 1
  assert all(r["ptx_loss"] > 0 for r in rows)
  # KL / score beyond ppo.kl_warn / ppo.score_warn: a loud log line and a 0/1 metric.
  assert all(r["score_warn"] == 1 for r in rows)
  assert any(r["kl_warn"] == 1 for r in rows)
  assert "WARNING iteration" in ref.stderr and "beyond ppo.score_warn=1e-09" in ref.stderr
  assert "beyond ppo.kl_warn=1e-09" in ref.stderr


# ---------------------------------------------------------------- preemption


def test_sigterm_checkpoints_at_step_boundary_exits_0_and_resumes(files, sft_ref, tmp_path):
  args = sft_args(files)
  workdir = str(tmp_path / "w")
  run = Run(workdir, *args)
  wait_until(run, past_first_checkpoint(workdir), what="the first checkpoint")
  t0 = time.monotonic()
  run.proc.send_signal(signal.SIGTERM)
  rc = run.wait(timeout=60)
  elapsed = time.monotonic() - t0
  assert rc == 0, run.stderr[-4000:]
  assert elapsed < 30, elapsed
  assert "SIGTERM received" in run.stderr and "after SIGTERM; exiting" in run.stderr
  assert not os.path.isdir(os.path.join(workdir, "export"))
  logged = _metrics(workdir)
  stopped_at = max(r["step"] for r in logged)
  assert stopped_at < 24
  assert _ckpt_steps(workdir)[-1] == stopped_at   # checkpointed the step it stopped after
  again = Run(workdir, *args).ok()
  assert f"at step {stopped_at}" in again.stderr
  new = _metrics(workdir)[len(logged):]
  assert new and new[0]["step"] == stopped_at + 1 > 1
  assert os.path.isdir(os.path.join(workdir, "export", "policy"))
  sft_ref.ok()   # ... and the preempted run ends exactly where the uninterrupted one does
  assert_same_metrics(sft_ref.workdir, workdir)
  assert_same_export(sft_ref.workdir, workdir, "policy")


# ---------------------------------------------------------------- corrupted latest checkpoint


def test_corrupted_latest_checkpoint_is_reported_and_the_previous_used(files, sft_ref,
                                                                       tmp_path):
  sft_ref.ok()
  workdir = str(tmp_path / "w")
  shutil.copytree(sft_ref.workdir, workdir)
  shutil.rmtree(os.path.join(workdir, "export"))
  steps = _ckpt_steps(workdir)
  assert steps == [22, 24]
  latest = os.path.join(workdir, "checkpoints", "24", "state")
  for root, _, names in os.walk(latest):   # a damaged disk: data files cut in half
    for name in names:
      path = os.path.join(root, name)
      if os.sep + "d" + os.sep in path:
        with open(path, "r+b") as fh:
          fh.truncate(os.path.getsize(path) // 2)
  # Rerun with more steps: it must continue from step 22, saying so.
  run = Run(workdir, *sft_args(files, steps=26)).ok()
  assert "checkpoint step 24" in run.stderr and "could not be restored" in run.stderr
  assert "restored checkpoint step 22" in run.stderr
  assert "at step 22" in run.stderr
  assert any(n.startswith("24.corrupt-") for n in os.listdir(os.path.join(workdir,
                                                                          "checkpoints")))
  rows = comparable(workdir)
  ref = comparable(sft_ref.workdir)
  assert rows[:22] == ref[:22]          # history up to the good checkpoint is kept
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 27))
  assert _ckpt_steps(workdir)[-1] == 26
