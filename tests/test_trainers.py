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

# Learning from SFT (see the test): measured margins, with the values seen in the note.
SCORE_GAIN = 1.5     # seen: +2.80 (PPO-ptx), +3.02 (PPO) held-out RM score over the first rollouts
KL_BOUND = 10.0      # seen: max KL 5.2 (PPO-ptx), 6.9 (PPO) per response, beta 0.05 (the sign
# and scale of the KL term are pinned sharply by test_ppo_optimum; this bounds the drift)
PTX_GAIN = 1.0      # seen: pretraining loss 0.93 with ptx vs 3.71 without (SFT 2.10)


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


@pytest.fixture(scope="module")
def sft_workdir(base_model, tmp_path_factory):
  """The copy task learned by SFT from the base model: PPO's starting point."""
  tmp = tmp_path_factory.mktemp("sft")
  train = helpers.write_jsonl(str(tmp / "sft.jsonl"), helpers.copy_rows(128, length=2))
  workdir = str(tmp / "sft")
  _assert_ok(helpers.run_launcher(
      "configs/sft.py", workdir, "--config.task=", f"--config.model.init_from={base_model}",
      f"--config.data.train.path={train}", "--config.train.steps=30",
      "--config.train.batch_size=16", "--config.data.max_prompt_len=8",
      "--config.data.max_len=16", "--config.optim.lr=3e-3"))
  return workdir


def _ppo_from_sft(sft_workdir, rm_workdir, tmp_path, name, ptx_coef, ptx):
  prompts = helpers.write_jsonl(str(tmp_path / "prompts.jsonl"),
                                [dict(prompt=r["prompt"]) for r in helpers.copy_rows(64)])
  evalp = helpers.write_jsonl(str(tmp_path / "prompts_eval.jsonl"),
                              [dict(prompt=r["prompt"]) for r in helpers.copy_rows(32, seed=9)])
  workdir = str(tmp_path / name)
  _assert_ok(helpers.run_launcher(
      "configs/ppo.py", workdir, "--config.task=", f"--config.model.init_from={sft_workdir}",
      f"--config.ppo.reward_from={rm_workdir}", f"--config.data.train.path={prompts}",
      f"--config.data.eval.path={evalp}", f"--config.data.ptx.path={ptx}",
      f"--config.ppo.ptx_coef={ptx_coef}", "--config.ppo.ptx_batch_size=8",
      "--config.ppo.iterations=16", "--config.train.batch_size=16",
      "--config.ppo.minibatches=2", "--config.ppo.max_new_tokens=6",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16",
      "--config.optim.lr=3e-3", "--config.ppo.kl_coef=0.05", "--config.ppo.no_eos_penalty=0",
      "--config.train.eval_every=8", "--config.train.eval_batches=2",
      # responses cut to 2, 4 or 6 tokens by the longest of each rollout
      "--config.data.bucket_min_len=2"))
  return workdir


def _pretraining_loss(policy_dir, ptx_eval):
  """Mean next-token NLL of a policy on held-out pretraining text (the alignment tax)."""
  import jax
  from rlhf_jax import data, models, objectives
  from rlhf_jax import workdir as workdir_lib
  cfg, params = models.load_hf(policy_dir)
  tok = workdir_lib.read_tokenizer(policy_dir)
  arrays = data.load_text(data.DataSpec(path=ptx_eval), tok, 16, pack=True).arrays
  loss, _ = jax.jit(lambda p, b: objectives.lm_loss_and_count(cfg, p, b))(params, arrays)
  return float(loss)


def test_ppo_from_sft_raises_the_reward_with_bounded_kl_and_ptx_keeps_pretraining(
    sft_workdir, rm_workdir, tmp_path):
  """From an SFT policy: the held-out RM score rises by a margin, the KL stays bounded, and
  the ptx term keeps the pretraining loss lower than the same run without it."""
  # Pretraining text: a different distribution than the copy task's answers.
  docs = [dict(text=" ".join(random.Random(i).choice("abcde") for _ in range(12)))
          for i in range(96)]
  ptx = helpers.write_jsonl(str(tmp_path / "ptx.jsonl"), docs[:64])
  ptx_eval = helpers.write_jsonl(str(tmp_path / "ptx_eval.jsonl"), docs[64:])
  with_ptx = _ppo_from_sft(sft_workdir, rm_workdir, tmp_path, "ppo", 1.0, ptx)
  without = _ppo_from_sft(sft_workdir, rm_workdir, tmp_path, "ppo_noptx", 0.0, ptx)
  for workdir in (with_ptx, without):
    rows = [r for r in helpers.read_metrics(workdir) if "score" in r]
    assert len(rows) == 16
    evals = [r for r in helpers.read_metrics(workdir) if "eval/score" in r]
    for key in ("kl", "kl_coef", "entropy", "policy_clip_frac", "value_clip_frac",
                "value_loss", "explained_variance", "response_length", "tokens_per_sec",
                "time_generate", "ptx_loss", "time_score", "time_train"):
      assert key in rows[-1], key
    first = np.mean([r["score"] for r in rows[:2]])
    final = evals[-1]["eval/score"]
    print(f"[learning from SFT] {os.path.basename(workdir)}: score {first:.4f} -> eval "
          f"{final:.4f}, max KL {max(r['kl'] for r in rows):.4f}")
    assert final > first + SCORE_GAIN, (workdir, first, final)
    assert max(r["kl"] for r in rows) < KL_BOUND, [r["kl"] for r in rows]
  tax = {w: _pretraining_loss(os.path.join(w, "export", "policy"), ptx_eval)
         for w in (with_ptx, without)}
  sft_loss = _pretraining_loss(os.path.join(sft_workdir, "export", "policy"), ptx_eval)
  print(f"[learning from SFT] pretraining loss: SFT {sft_loss:.4f}, PPO-ptx "
        f"{tax[with_ptx]:.4f}, PPO {tax[without]:.4f}")
  assert tax[without] > tax[with_ptx] + PTX_GAIN, (sft_loss, tax)


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
