"""A reward function in a two-process run: each process scores its own rows, correctly.

`launch/train.py` as two processes on loopback (2 fake CPU devices each, the batch split
over mesh data=4 so each process holds half of every rollout) against ONE process with 4
devices and the same config: the function's scores, the total score and samples.jsonl
(written by process 0 from its own rows, the first half of the batch) must be the same. A
function that fails on one process only must stop both with a one-line error (no hang).
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import numpy as np
import pytest

import helpers
from rlhf_jax import samples_log
from test_scale_out_multiprocess import _env, _free_port

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoint (test extra)")

TIMEOUT_S = 300
FAIL_TIMEOUT_S = 150   # the failing run stops at its first rollout (~20 s on 2 busy cores)
RTOL, ATOL = 1e-5, 1e-6

REWARDS = """
import jax

def count(prompts, responses):
  # depends on the prompt and the response, so a row mix-up changes the score
  return [len(r.split()) + 0.1 * len(p) for p, r in zip(prompts, responses)]

def nan_on_process_1(prompts, responses):
  return [float("nan") if jax.process_index() == 1 else 1.0 for _ in responses]
"""


def _run(workdir, overrides, processes):
  """Runs the launcher as `processes` processes; returns [(exit code, log text)]."""
  cmd = helpers.launcher_cmd("configs/ppo.py", workdir, *overrides)
  port, procs = _free_port(), []
  for pid in range(processes):
    extra = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",
                                       f"--num_processes={processes}", f"--process_id={pid}"]
    log = open(f"{workdir}.log{pid}", "w")
    procs.append((subprocess.Popen(cmd + extra, cwd=helpers.REPO, stdout=subprocess.DEVNULL,
                                   stderr=log, env=_env(4 // processes)), log))
  return procs


def _wait(procs, timeout=TIMEOUT_S):
  out = []
  try:
    for proc, log in procs:
      try:
        out.append((proc.wait(timeout=timeout), log.name))
      except subprocess.TimeoutExpired:
        out.append(("timeout", log.name))
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  return [(code, open(name).read()) for code, name in out]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rf_mp")
  (tmp / "rewards.py").write_text(textwrap.dedent(REWARDS))
  prompts = helpers.write_jsonl(str(tmp / "prompts.jsonl"),
                                [dict(prompt=r["prompt"]) for r in helpers.copy_rows(32, 2)])
  base = helpers.tiny_hf_llama(str(tmp / "base"))
  common = ["--config.task=", f"--config.model.init_from={base}",
            f"--config.data.train.path={prompts}", "--config.ppo.ptx_coef=0",
            "--config.data.max_prompt_len=8", "--config.data.max_len=14",
            "--config.ppo.iterations=2", "--config.train.batch_size=8",
            "--config.ppo.minibatches=2", "--config.ppo.max_new_tokens=6",
            "--config.optim.lr=3e-3", "--config.train.sample_every=1",
            "--config.train.samples_logged=3", "--config.mesh.data=4",
            "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
  return tmp, common


def test_two_processes_score_their_own_rows_like_one_process(setup):
  tmp, common = setup
  overrides = common + [f"--config.ppo.reward_fn={tmp / 'rewards.py'}:count"]
  workdirs = {n: str(tmp / f"ok_{n}proc") for n in (2, 1)}
  results = _wait(_run(workdirs[2], overrides, 2) + _run(workdirs[1], overrides, 1))
  assert all(code == 0 for code, _ in results), [text[-3000:] for _, text in results]
  multi, single = (helpers.read_metrics(workdirs[n]) for n in (2, 1))
  assert [r["step"] for r in multi] == [r["step"] for r in single]
  for a, b in zip(multi, single):
    for k in ("fn_score", "score", "kl", "policy_loss"):
      if k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)
  assert sum("fn_score" in r for r in multi) == 2
  rows = {n: samples_log.read_samples(workdirs[n]) for n in (2, 1)}
  assert len(rows[2]) == len(rows[1]) == 6       # process 0 alone wrote, 3 rows per step
  for a, b in zip(rows[2], rows[1]):
    assert (a["step"], a["row"], a["prompt"], a["response"]) == \
        (b["step"], b["row"], b["prompt"], b["response"])
    np.testing.assert_allclose([a["score"], a["fn_score"], a["kl"]],
                               [b["score"], b["fn_score"], b["kl"]], rtol=RTOL, atol=ATOL)
    assert a["fn_score"] == pytest.approx(len(a["response"].split()) + 0.1 * len(a["prompt"]))
  assert not os.path.exists(os.path.join(workdirs[2], "samples.jsonl.tmp"))


def test_a_function_failing_on_one_process_stops_both(setup):
  tmp, common = setup
  overrides = common + [f"--config.ppo.reward_fn={tmp / 'rewards.py'}:nan_on_process_1"]
  results = _wait(_run(str(tmp / "bad_2proc"), overrides, 2), FAIL_TIMEOUT_S)
  codes = [code for code, _ in results]
  assert all(code not in (0, "timeout") for code in codes), codes
  for pid, (_, text) in enumerate(results):
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: ppo.reward_fn=") and "nan_on_process_1" in errors[0]
    assert ("returned nan at row 0" if pid == 1 else "failed on process 1") in errors[0]
