"""Two processes through the real launcher equal one process with the same 4 devices.

`launch/train.py --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i` runs
as two processes on loopback (2 fake CPU devices each, gloo collectives); the reference is
ONE process with 4 fake devices (`--xla_force_host_platform_device_count=4`) and the same
config. A few steps of SFT (mesh fsdp=4: params split across the two processes) and of
PPO-ptx (mesh fsdp=2 × tensor=2) must log the same metrics, and only process 0 writes
metrics.jsonl and the export.

Each host feeds only its slice of every global batch, so equal metrics also prove the hosts
agree on the data order. Tolerance rtol 1e-5 / atol 1e-6: the two runs execute the same
partitioned program, but cross-process all-reduces (gloo) may sum in another order than
in-process ones.
"""

from __future__ import annotations

import os
import socket
import subprocess

import numpy as np
import pytest

import helpers

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoint (test extra)")

TIMEOUT_S = 420
RTOL, ATOL = 1e-5, 1e-6
# Metrics that are wall-clock measurements, not results.
TIMING = ("steps_per_sec", "tokens_per_sec", "time_generate", "time_score", "time_train")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _launch(config: str, workdir: str, overrides, tag: str, processes: int):
  """Starts the launcher as `processes` processes (sharing `workdir`); returns Popens."""
  cmd = helpers.launcher_cmd(config, workdir, *overrides)
  port = _free_port()
  procs = []
  for pid in range(processes):
    extra = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",
                                       f"--num_processes={processes}", f"--process_id={pid}"]
    log = open(f"{workdir}.{tag}.log{pid}", "w")
    procs.append((subprocess.Popen(cmd + extra, cwd=helpers.REPO, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   env=_env(4 // processes)), log, log.name))
  return procs


def _wait(all_procs):
  """Waits for every process (killing stragglers at the timeout); fails with the logs."""
  codes = []
  try:
    for proc, _, _ in all_procs:
      try:
        codes.append(proc.wait(timeout=TIMEOUT_S))
      except subprocess.TimeoutExpired:
        codes.append("timeout")
        break
  finally:
    for proc, log, _ in all_procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  if any(c != 0 for c in codes) or len(codes) != len(all_procs):
    logs = "\n".join(f"--- {name} (exit {code}) ---\n" + open(name).read()[-4000:]
                     for (_, _, name), code in zip(all_procs, codes + ["?"] * len(all_procs)))
    pytest.fail(f"launcher exit codes {codes}\n{logs}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """SFT and PPO, each as 2 processes × 2 devices and as 1 process × 4 devices (at once)."""
  tmp = tmp_path_factory.mktemp("scale_out_mp")
  base = helpers.tiny_hf_llama(str(tmp / "base"))
  sft = helpers.write_jsonl(str(tmp / "sft.jsonl"), helpers.copy_rows(48, 0))
  sft_eval = helpers.write_jsonl(str(tmp / "sft_eval.jsonl"), helpers.copy_rows(16, 1))
  prompts = helpers.write_jsonl(str(tmp / "prompts.jsonl"),
                                [dict(prompt=r["prompt"]) for r in helpers.copy_rows(48, 2)])
  text = helpers.write_jsonl(str(tmp / "text.jsonl"), [
      dict(text=r["prompt"] + " " + r["completion"]) for r in helpers.copy_rows(64, 3)])
  common = ["--config.task=", f"--config.model.init_from={base}",
            "--config.data.max_prompt_len=8", "--config.data.max_len=16"]
  stages = dict(
      sft=("configs/sft.py", common + [
          f"--config.data.train.path={sft}", f"--config.data.eval.path={sft_eval}",
          "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.grad_accum=2", "--config.train.eval_batches=1",
          "--config.optim.lr=3e-3", "--config.optim.warmup_steps=0",
          "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=1"]),
      ppo=("configs/ppo.py", common + [
          f"--config.ppo.reward_from={base}", f"--config.data.train.path={prompts}",
          f"--config.data.ptx.path={text}", "--config.ppo.ptx_batch_size=2",
          "--config.ppo.iterations=2", "--config.train.batch_size=8",
          "--config.ppo.minibatches=2", "--config.ppo.max_new_tokens=6",
          "--config.optim.lr=3e-3", "--config.ppo.kl_coef=0.05",
          "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]))
  procs, workdirs = [], {}
  for name, (config, overrides) in stages.items():
    for processes in (2, 1):
      workdir = str(tmp / f"{name}_{processes}proc")
      workdirs[name, processes] = workdir
      procs += _launch(config, workdir, overrides, name, processes)
  _wait(procs)
  return workdirs


def _compare(workdirs, stage, keys):
  multi = helpers.read_metrics(workdirs[stage, 2])
  single = helpers.read_metrics(workdirs[stage, 1])
  # Process 0 alone writes: one record per logged step, not two.
  assert [r["step"] for r in multi] == [r["step"] for r in single]
  assert len({r["step"] for r in multi if "loss" in r}) == len([r for r in multi if "loss" in r])
  for a, b in zip(multi, single):
    assert set(a) == set(b)
    for k in a:
      if k in TIMING or k in ("stage", "step", "time", "wall_time") or \
          not isinstance(a[k], (int, float)):
        continue
      np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f"{stage} {k}")
  for key in keys:
    assert any(key in r for r in multi), key
  return multi


def test_sft_two_processes_match_one_process(runs):
  rows = _compare(runs, "sft", ("loss", "grad_norm", "eval/loss"))
  assert len([r for r in rows if "loss" in r]) == 3
  assert os.path.isfile(os.path.join(runs["sft", 2], "export", "policy", "config.json"))


def test_ppo_two_processes_match_one_process(runs):
  rows = _compare(runs, "ppo", ("score", "kl", "policy_loss", "value_loss", "ptx_loss"))
  assert len([r for r in rows if "score" in r]) == 2
  assert os.path.isfile(os.path.join(runs["ppo", 2], "export", "policy", "config.json"))
