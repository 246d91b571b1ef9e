"""Each stage through the real launcher, on a tiny HF checkpoint and jsonl data in tmp dirs.

Oracles: the exported policy must load in transformers with equal logits; the RM must learn a
synthetic preference the test defines ("good" beats "bad"); PPO against that RM must raise
the score while the KL to the SFT model stays bounded.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

import helpers

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints (test extra)")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  return helpers.tiny_hf_llama(str(tmp_path_factory.mktemp("base")))


def _pref_rows(n, seed=0):
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    xs = " ".join(rng.choice("abcde") for _ in range(2))
    pos = rng.randrange(3)
    good = xs.split() + []
    good.insert(pos, "good")
    bad = xs.split()
    bad.insert(pos, "bad")
    rows.append(dict(prompt="say : " + xs + " =", chosen=" ".join(good), rejected=" ".join(bad)))
  return rows


def _assert_ok(proc):
  assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def test_sft_through_launcher_and_export_parity(base_model, tmp_path):
  import transformers
  # Short training rows (7 tokens) and longer eval rows (11): with bucket_min_len=4 the train
  # batches are cut to 8 columns and the eval batches to 16 (two compiled shapes per step).
  train = helpers.write_jsonl(str(tmp_path / "sft.jsonl"), helpers.copy_rows(64, length=1))
  evalp = helpers.write_jsonl(str(tmp_path / "sft_eval.jsonl"), helpers.copy_rows(32, seed=1))
  workdir = str(tmp_path / "sft")
  proc = helpers.run_launcher(
      "configs/sft.py", workdir, "--config.task=", f"--config.model.init_from={base_model}",
      f"--config.data.train.path={train}", f"--config.data.eval.path={evalp}",
      "--config.train.steps=6", "--config.train.batch_size=8", "--config.train.log_every=2",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16", "--config.optim.lr=3e-3",
      "--config.data.bucket_min_len=4")
  _assert_ok(proc)
  rows = helpers.read_metrics(workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert all(r["stage"] == "sft" for r in rows)
  assert any("eval/loss" in r for r in rows)
  # The exported policy loads in transformers and its logits equal ours.
  from rlhf_jax import models
  export = os.path.join(workdir, "export", "policy")
  hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  cfg, params = models.load_hf(export)
  ids = np.array([[4, 5, 6, 7, 8, 9], [0, 0, 4, 12, 13, 11]], np.int32)
  mask = (ids != 0).astype(np.int32)
  ours = np.asarray(models.logits(cfg, params, ids, mask))
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4)
  # Rerunning the same command resumes from the final checkpoint and does not retrain.
  proc = helpers.run_launcher(
      "configs/sft.py", workdir, "--config.task=", f"--config.model.init_from={base_model}",
      f"--config.data.train.path={train}", "--config.train.steps=6",
      "--config.train.batch_size=8", "--config.data.max_prompt_len=8",
      "--config.data.max_len=16")
  _assert_ok(proc)
  assert len([r for r in helpers.read_metrics(workdir) if "loss" in r]) == 3


@pytest.fixture(scope="module")
def rm_workdir(base_model, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rm")
  train = helpers.write_jsonl(str(tmp / "pairs.jsonl"), _pref_rows(256))
  evalp = helpers.write_jsonl(str(tmp / "pairs_eval.jsonl"), _pref_rows(64, seed=1))
  norm = helpers.write_jsonl(str(tmp / "demos.jsonl"), helpers.copy_rows(32))
  workdir = str(tmp / "rm")
  proc = helpers.run_launcher(
      "configs/rm.py", workdir, "--config.task=", f"--config.model.init_from={base_model}",
      f"--config.data.train.path={train}", f"--config.data.eval.path={evalp}",
      f"--config.data.norm.path={norm}", "--config.train.steps=40",
      "--config.train.batch_size=16", "--config.train.log_every=10",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16", "--config.optim.lr=3e-3")
  _assert_ok(proc)
  return workdir


def test_rm_learns_a_synthetic_preference(rm_workdir):
  rows = helpers.read_metrics(rm_workdir)
  final = [r for r in rows if "eval/accuracy" in r][-1]
  assert final["eval/accuracy"] >= 0.9, final
  norm = json.load(open(os.path.join(rm_workdir, "export", "reward_model",
                                     "reward_normalization.json")))
  assert np.isfinite(norm["mean"]) and norm["n"] == 32


def test_ppo_raises_the_toy_reward_with_bounded_kl(base_model, rm_workdir, tmp_path):
  prompts = helpers.write_jsonl(str(tmp_path / "prompts.jsonl"),
                                [dict(prompt=r["prompt"]) for r in helpers.copy_rows(64)])
  ptx = helpers.write_jsonl(str(tmp_path / "ptx.jsonl"),
                            [dict(text=r["prompt"] + " " + r["completion"]) for r in helpers.copy_rows(64)])
  workdir = str(tmp_path / "ppo")
  proc = helpers.run_launcher(
      "configs/ppo.py", workdir, "--config.task=", f"--config.model.init_from={base_model}",
      f"--config.ppo.reward_from={rm_workdir}", f"--config.data.train.path={prompts}",
      f"--config.data.ptx.path={ptx}", "--config.ppo.ptx_coef=0.1",
      "--config.ppo.iterations=16", "--config.train.batch_size=16",
      "--config.ppo.minibatches=2", "--config.ppo.max_new_tokens=6",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16",
      "--config.optim.lr=3e-3", "--config.ppo.kl_coef=0.05", "--config.ppo.no_eos_penalty=0",
      # responses cut to 2, 4 or 6 tokens by the longest of each rollout
      "--config.data.bucket_min_len=2")
  _assert_ok(proc)
  rows = [r for r in helpers.read_metrics(workdir) if "score" in r]
  assert len(rows) == 16
  first = np.mean([r["score"] for r in rows[:3]])
  last = np.mean([r["score"] for r in rows[-3:]])
  assert last > first + 0.1, (first, last)
  for key in ("kl", "kl_coef", "entropy", "policy_clip_frac", "value_clip_frac", "value_loss",
              "explained_variance", "response_length", "tokens_per_sec", "time_generate",
              "ptx_loss",
              "time_score", "time_train"):
    assert key in rows[-1], key
  assert max(r["kl"] for r in rows) < 20.0
  assert os.path.isfile(os.path.join(workdir, "export", "policy", "config.json"))


def test_user_errors_are_one_line_without_traceback(tmp_path):
  proc = helpers.run_launcher("configs/sft.py", str(tmp_path / "w"), "--config.task=",
                              "--config.data.train.path=/nonexistent/x.jsonl")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert "data.train.path" in proc.stderr
  proc = helpers.run_launcher("configs/ppo.py", str(tmp_path / "w"),
                              "--config.ppo.top_p=1.5")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "ppo.top_p" in proc.stderr
