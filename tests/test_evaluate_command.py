"""launch/evaluate.py: policy vs baseline, judged by a reward model and a reward function.

The numbers in `eval.json` are recomputed here from the per-prompt rows of
`eval_samples.jsonl`, and those rows' scores from an independent scoring of the same texts;
a policy against itself has KL 0 and ties everywhere; the interval is the documented Wilson
interval.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import command_helpers
import helpers

torch = pytest.importorskip("torch", reason="the tiny HF models are built with transformers")

NORM = dict(mean=0.25, std=2.0, gain=True, n=10)
Z = 1.959963984540054


def wilson(p: float, n: int) -> tuple:
  """The Wilson score interval, written out as `compare`'s docstring states it."""
  centre = (p + Z ** 2 / (2 * n)) / (1 + Z ** 2 / n)
  half = Z / (1 + Z ** 2 / n) * math.sqrt(p * (1 - p) / n + Z ** 2 / (4 * n ** 2))
  return centre - half, centre + half


def independent_rm_scores(rm_dir: str, rows: list, name: str) -> np.ndarray:
  """Each (prompt, response) of `rows`, tokenized here and scored one at a time."""
  import jax.numpy as jnp
  from rlhf_jax import models
  cfg, params = models.load_hf(rm_dir)
  tok = helpers.word_tokenizer()
  out = []
  for row in rows:
    ids = tok(row["prompt"], add_special_tokens=False)["input_ids"] + \
        tok(row[name], add_special_tokens=False)["input_ids"] + \
        ([tok.eos_token_id] if row[f"{name}_finished"] else [])
    raw = models.scores(cfg, params, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                        jnp.asarray([len(ids) - 1]))
    out.append((float(raw[0]) - NORM["mean"]) / NORM["std"])
  return np.asarray(out)


def test_win_rates_agree_with_the_samples_and_an_independent_scoring(tmp_path):
  policy = helpers.tiny_hf_llama(str(tmp_path / "a"), seed=0)
  baseline = helpers.tiny_hf_llama(str(tmp_path / "b"), seed=1)
  rm = command_helpers.tiny_reward_model(str(tmp_path / "rm"), seed=2, normalization=NORM)
  prompts = helpers.write_jsonl(str(tmp_path / "prompts.jsonl"),
                                command_helpers.prompt_rows(12, seed=4))
  reward_py = tmp_path / "rewards.py"
  reward_py.write_text("def length(prompts, responses):\n"
                       "  return [float(len(r.split()) % 3) for r in responses]\n")
  out = str(tmp_path / "eval")
  proc = command_helpers.run_command(
      "evaluate.py", f"--policy={policy}", f"--baseline={baseline}", f"--prompts={prompts}",
      f"--reward_model={rm}", f"--reward_fn={reward_py}:length", f"--out_dir={out}",
      "--max_new_tokens=6", "--temperature=0.8", "--batch_size=5", "--seed=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(os.path.join(out, "eval.json")))
  rows = command_helpers.read_jsonl(os.path.join(out, "eval_samples.jsonl"))
  n = len(rows)
  assert result["n_prompts"] == n == 12 and result["judges"] == ["reward_model", "reward_fn"]
  assert result["ci_method"].startswith("Wilson")
  for judge in result["judges"]:
    a = np.array([r["scores"][judge]["policy"] for r in rows])
    b = np.array([r["scores"][judge]["baseline"] for r in rows])
    wins, ties = int((a > b).sum()), int((a == b).sum())
    rate = (wins + ties / 2) / n
    assert result["wins_ties_losses"][judge] == [wins, ties, n - wins - ties]
    assert result["win_rate"][judge] == pytest.approx(rate, abs=1e-12)
    lo, hi = result["win_rate_ci95"][judge]
    assert (lo, hi) == pytest.approx(wilson(rate, n), abs=1e-12)
    assert lo <= rate <= hi
    assert result["mean_score"][judge] == pytest.approx(
        dict(policy=a.mean(), baseline=b.mean()), abs=1e-6)
  assert result["wins_ties_losses"]["reward_fn"][1] < n   # the judges see differences
  for name in ("policy", "baseline"):
    assert [r["scores"]["reward_fn"][name] for r in rows] == [
        float(len(r[name].split()) % 3) for r in rows]
    np.testing.assert_allclose([r["scores"]["reward_model"][name] for r in rows],
                               independent_rm_scores(rm, rows, name), atol=1e-5)
    assert result["mean_response_tokens"][name] == pytest.approx(
        np.mean([r[f"{name}_tokens"] for r in rows]))
    assert result["finished_rate"][name] == pytest.approx(
        np.mean([r[f"{name}_finished"] for r in rows]))
  assert result["kl_policy_baseline"] == pytest.approx(np.mean([r["kl"] for r in rows]),
                                                       abs=1e-6)
  assert result["kl_policy_baseline"] != 0.0
  report = open(os.path.join(out, "report.md")).read()
  assert "win rate over the baseline, reward model" in report and "| prompt | policy |" in report
  for png in ("score_hist.png", "score_diff.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000


def test_a_policy_against_itself_has_kl_zero_and_only_ties(tmp_path):
  """In this process: the mesh spans the suite's 8 CPU devices, so batches are sharded."""
  from rlhf_jax import compare, sample_responses
  workdir = tmp_path / "run"
  helpers.tiny_hf_llama(str(workdir / "export" / "policy"))
  prompts = helpers.write_jsonl(str(tmp_path / "prompts.jsonl"),
                                command_helpers.prompt_rows(6, seed=5))
  result = compare.evaluate(compare.Request(
      policy=str(workdir), baseline=str(workdir / "export" / "policy"), prompts=prompts,
      reward_fn="command_helpers:word_count_reward", mesh="data=-1",
      settings=sample_responses.Settings(max_new_tokens=5, temperature=0.7, batch_size=3)))
  assert result["kl_policy_baseline"] == 0.0
  assert result["win_rate"] == {"reward_fn": 0.5}
  assert result["wins_ties_losses"]["reward_fn"] == [0, 6, 0]
  rows = command_helpers.read_jsonl(str(workdir / "eval_samples.jsonl"))   # the policy's workdir
  assert [r["kl"] for r in rows] == [0.0] * 6
  assert all(r["policy"] == r["baseline"] for r in rows)


def test_wilson_interval():
  from rlhf_jax import compare
  for n in (1, 7, 100):
    for k in range(0, 2 * n + 1):
      p = k / (2 * n)                                   # every rate ties can give
      lo, hi = compare.wilson_interval(p, n)
      assert 0.0 <= lo <= p <= hi <= 1.0
      assert (lo, hi) == pytest.approx(wilson(p, n), abs=1e-12)
  assert compare.wilson_interval(0.6, 100) == pytest.approx((0.502, 0.691), abs=1e-3)
  r = compare.win_rate([1.0, 2.0, 3.0, 0.0], [0.5, 2.0, 4.0, 0.0])
  assert (r["win_rate"], r["wins"], r["ties"], r["losses"]) == (0.5, 1, 2, 1)


def test_default_out_dir_is_the_policy_workdir(tmp_path):
  from rlhf_jax import compare
  from rlhf_jax.errors import UserError
  export = tmp_path / "run" / "export" / "policy"
  export.mkdir(parents=True)
  (export / "config.json").write_text("{}")
  assert compare.default_out_dir(str(tmp_path / "run")) == str(tmp_path / "run")
  assert compare.default_out_dir(str(export)) == str(tmp_path / "run")
  with pytest.raises(UserError, match="--out_dir"):
    compare.default_out_dir(str(tmp_path / "hf_model"))


def test_reward_fn_mistakes_name_the_flag(tmp_path):
  from rlhf_jax import compare
  from rlhf_jax.errors import UserError
  bad = tmp_path / "bad.py"
  bad.write_text("def wrong_count(prompts, responses):\n  return [1.0]\n")
  with pytest.raises(UserError, match=r"^--reward_fn=.*no file"):
    compare.load_reward_fn(str(tmp_path / "missing.py") + ":f")
  fn = compare.load_reward_fn(f"{bad}:wrong_count")
  with pytest.raises(UserError, match=r"^--reward_fn=.*returned 1 scores for 2 responses"):
    fn(["p", "q"], ["a", "b"])
