"""The DPO stage (`configs/dpo.py`, `rlhf_jax/trainers/dpo.py`) end to end.

Oracles:
- one training step's loss and pair metrics equal a float64 numpy reference written from the
  papers' formulas (DPO eq. 7 / cDPO / IPO eq. 17 / Plackett–Luce App. A.3 with Breslow
  ties) on sequence log-probs from transformers' PyTorch model in float64, the reference
  being the init checkpoint and the policy our params after one update, exported; at step 0
  (policy = reference) every pair term is log 2;
- K-way Plackett–Luce on K = 2 ranking rows trains exactly as pairwise DPO on the same
  chosen/rejected rows, through `dpo.train`;
- a run SIGKILLed after its first checkpoint and restarted ends with the uninterrupted run's
  metrics and bit-identical export;
- one step on a 4-device (data 2 × fsdp 2) mesh equals one device;
- the README's DPO commands (built-in task and user data) run as written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import data, models, sharding
from rlhf_jax.trainers import dpo, model_init

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints")

MAX_PROMPT, MAX_LEN, B = 8, 16, 8
RULES = dict(sharding.DEFAULT_RULES)


# ------------------------------------------------------------------------------ data


def _prompt(rng):
  return "say : " + " ".join(rng.choice("abcde") for _ in range(2)) + " ="


def ranking_rows(n, seed=0):
  """K = 2..4 responses per prompt ("good x" > "x" > "bad x" > "bad bad"), slots shuffled;
  the K = 3 rows have a tie."""
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    p = _prompt(rng)
    x = p.split(":")[1].strip(" =")
    pool = [("good " + x, 0), (x, 1), ("bad " + x, 2), ("bad bad", 3)]
    if i % 3 == 1:   # K = 3 with a tie for first (two equally good answers)
      picked = rng.sample([pool[0], ("good good " + x, 0), pool[2]], 3)
    else:            # K = 2 or 4
      picked = rng.sample(pool, 2 + i % 3)
    rows.append(dict(prompt=p, responses=[t for t, _ in picked], ranks=[r for _, r in picked]))
  return rows


def pair_rows(n, seed=0):
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    p = _prompt(rng)
    x = p.split(":")[1].strip(" =")
    rows.append(dict(prompt=p, chosen="good " + x, rejected="bad " + rng.choice("abcde")))
  return rows


def as_rankings(pairs):
  """The same pairs as K = 2 ranking rows, every other one with the slots swapped."""
  out = []
  for i, r in enumerate(pairs):
    texts, ranks = [r["chosen"], r["rejected"]], [0, 1]
    if i % 2:
      texts, ranks = texts[::-1], ranks[::-1]
    out.append(dict(prompt=r["prompt"], responses=texts, ranks=ranks))
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("dpo_data")
  pairs = pair_rows(32)
  return dict(
      base=helpers.tiny_hf_llama(str(d / "base")),
      rankings=helpers.write_jsonl(str(d / "rankings.jsonl"), ranking_rows(48)),
      rankings_eval=helpers.write_jsonl(str(d / "rankings_eval.jsonl"), ranking_rows(16, 1)),
      pairs=helpers.write_jsonl(str(d / "pairs.jsonl"), pairs),
      pairs_k2=helpers.write_jsonl(str(d / "pairs_k2.jsonl"), as_rankings(pairs)))


# ------------------------------------------------------------ float64 references


def torch_logprobs(model_dir, arrays):
  """log π(y|x) [N, K] in float64 from transformers, each sequence on its own (no padding)."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
  n, k, _ = arrays["input_ids"].shape
  out = np.zeros((n, k))
  with torch.no_grad():
    for b in range(n):
      start = int(arrays["prompt_len"][b])
      for s in range(k):
        length = int(arrays["attention_mask"][b, s].sum())
        if not arrays["valid"][b, s]:
          continue
        ids = torch.tensor(arrays["input_ids"][b, s, :length][None], dtype=torch.long)
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1).numpy()
        out[b, s] = sum(logp[t - 1, arrays["input_ids"][b, s, t]] for t in range(start, length))
  return out


def _pairs(ranks, valid):
  k = len(ranks)
  return [(w, l) for w in range(k) for l in range(k)
          if valid[w] and valid[l] and ranks[w] < ranks[l]]


def reference_loss(policy, ref, ranks, valid, beta, rankings, loss, eps=0.0):
  """The batch loss from the papers' formulas, float64: mean over prompts with a pair."""
  per_prompt = []
  for b in range(len(policy)):
    u = beta * (policy[b] - ref[b])
    pairs = _pairs(ranks[b], valid[b])
    if not pairs:
      continue
    if rankings == "plackett_luce":
      # Breslow: each item not in the worst group against every valid item ranked >= it.
      total = 0.0
      for i in range(len(u)):
        worse = [j for j in range(len(u)) if valid[b][j] and ranks[b][j] > ranks[b][i]]
        if not valid[b][i] or not worse:
          continue
        risk = [u[j] for j in range(len(u)) if valid[b][j] and ranks[b][j] >= ranks[b][i]]
        total += np.log(np.sum(np.exp(risk))) - u[i]
      per_prompt.append(total)
    else:
      terms = []
      for w, l in pairs:
        h = (policy[b][w] - ref[b][w]) - (policy[b][l] - ref[b][l])
        if loss == "ipo":
          terms.append((h - 1 / (2 * beta)) ** 2)
        else:
          sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
          terms.append(-(1 - eps) * np.log(sig(beta * h)) - eps * np.log(sig(-beta * h)))
      per_prompt.append(np.mean(terms))
  return float(np.mean(per_prompt))


def reference_pair_stats(policy, ref, ranks, valid, beta):
  uw, ul = [], []
  for b in range(len(policy)):
    u = beta * (policy[b] - ref[b])
    for w, l in _pairs(ranks[b], valid[b]):
      uw.append(u[w]), ul.append(u[l])
  uw, ul = np.asarray(uw), np.asarray(ul)
  return dict(accuracy=np.mean(uw > ul), margin=np.mean(uw - ul), chosen_rewards=np.mean(uw),
              rejected_rewards=np.mean(ul))


# ------------------------------------------------------------- in-process helpers


def stage_config(rankings="plackett_luce", loss="dpo", eps=0.0, beta=0.5, lr=1e-2,
                 batch=B, grad_accum=1):
  c = config_lib.dpo_config()
  c.task = ""
  c.dpo.rankings, c.dpo.loss, c.dpo.label_smoothing, c.dpo.beta = rankings, loss, eps, beta
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=0, schedule="constant", final_lr_frac=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-6, grad_clip=0.0))
  c.train.batch_size, c.train.grad_accum = batch, grad_accum
  c.data.max_prompt_len, c.data.max_len = MAX_PROMPT, MAX_LEN
  return c


def placed(mesh, base):
  cfg, params = models.load_hf(base)
  return model_init.place(mesh, RULES, cfg.replace(dtype="float32"), "causal",
                          jax.device_get(params))


def one_device():
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def load_rows(path, n=B):
  arrays = data.load_comparisons(data.DataSpec(path=path), helpers.word_tokenizer(),
                                 MAX_PROMPT, MAX_LEN, 0).arrays
  return {k: v[:n] for k, v in arrays.items()}


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ----------------------------------------------------------------------- the tests


@pytest.mark.parametrize("rankings,loss,eps", [("plackett_luce", "dpo", 0.0),
                                               ("all_pairs", "dpo", 0.1),
                                               ("all_pairs", "ipo", 0.0)])
def test_step_loss_equals_float64_reference_from_transformers(files, tmp_path, rankings,
                                                              loss, eps):
  batch = load_rows(files["rankings"])
  assert batch["input_ids"].shape[1] == 4 and not batch["valid"].all()   # padding slots
  # The response tokens the sums run over: after `prompt_len`, exactly each response's text.
  tok, rows = helpers.word_tokenizer(), [json.loads(l) for l in open(files["rankings"])]
  for b in range(B):
    start, row = int(batch["prompt_len"][b]), rows[b]
    for k, text in enumerate(row["responses"]):
      ids = batch["input_ids"][b, k][batch["attention_mask"][b, k] > 0]
      assert tok.decode(ids[:start], skip_special_tokens=True) == row["prompt"]
      assert tok.decode(ids[start:], skip_special_tokens=True) == text
  assert any(len(set(r[v])) < v.sum() for r, v in zip(batch["ranks"], batch["valid"]))
  c = stage_config(rankings, loss, eps)
  mesh = one_device()
  model = placed(mesh, files["base"])
  parts = dpo.build(c, mesh, model, total_steps=10)
  state, m0 = dpo.step(parts, parts.init_state(), batch)
  # Step 0: policy = reference, every implicit reward is 0.
  ref_lp = torch_logprobs(files["base"], batch)
  zero = reference_loss(ref_lp, ref_lp, batch["ranks"], batch["valid"], c.dpo.beta, rankings,
                        loss, eps)
  np.testing.assert_allclose(float(m0["loss"]), zero, rtol=1e-6)
  if rankings == "all_pairs" and loss == "dpo":
    np.testing.assert_allclose(float(m0["loss"]), np.log(2), rtol=1e-6)
  # Step 1's loss is the moved policy's, against the frozen init checkpoint.
  moved = str(tmp_path / "moved")
  models.save_hf(model.cfg, host(state["params"]), moved)
  _, m1 = dpo.step(parts, state, batch)
  pol_lp = torch_logprobs(moved, batch)
  want = reference_loss(pol_lp, ref_lp, batch["ranks"], batch["valid"], c.dpo.beta, rankings,
                        loss, eps)
  assert abs(want - zero) > 1e-2, "the policy did not move: the check would be vacuous"
  np.testing.assert_allclose(float(m1["loss"]), want, rtol=2e-5, atol=2e-5)
  stats = reference_pair_stats(pol_lp, ref_lp, batch["ranks"], batch["valid"], c.dpo.beta)
  for key, value in stats.items():
    np.testing.assert_allclose(float(m1[key]), value, rtol=2e-5, atol=2e-5, err_msg=key)


def test_plackett_luce_on_k2_rankings_trains_as_pairwise_dpo(files, tmp_path):
  runs = {}
  for name, path, rankings in (("pl", files["pairs_k2"], "plackett_luce"),
                               ("dpo", files["pairs"], "all_pairs")):
    c = stage_config(rankings, beta=0.2, lr=3e-3)
    c.model.init_from, c.data.train.path = files["base"], path
    c.train.steps, c.train.log_every, c.train.progress = 6, 1, False
    config_lib.validate(c)
    dpo.train(c, str(tmp_path / name))
    runs[name] = str(tmp_path / name)
  rows = {n: [r for r in helpers.read_metrics(d) if "loss" in r] for n, d in runs.items()}
  assert len(rows["pl"]) == 6 and rows["pl"][0]["loss"] == pytest.approx(np.log(2), rel=1e-6)
  for a, b in zip(rows["pl"], rows["dpo"]):
    for key in ("loss", "accuracy", "margin", "chosen_rewards", "rejected_rewards"):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
  assert rows["pl"][-1]["loss"] < rows["pl"][0]["loss"] - 0.05   # it learned something
  from safetensors.numpy import load_file
  pa, pb = (load_file(os.path.join(d, "export", "policy", "model.safetensors"))
            for d in runs.values())
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)


def test_one_step_on_four_devices_equals_one_device(files):
  """... and 2 microbatches of 4 prompts equal one batch of 8 (each weighted by its share of
  the prompts that have a pair)."""
  batch = load_rows(files["rankings"])
  out = {}
  four = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
  for name, mesh, accum in (("one", one_device(), 2), ("four", four, 2),
                            ("one_unsplit", one_device(), 1)):
    c = stage_config("plackett_luce", lr=1e-3, grad_accum=accum)
    parts = dpo.build(c, mesh, placed(mesh, files["base"]), total_steps=10)
    state, m = dpo.step(parts, parts.init_state(), batch)
    state, m = dpo.step(parts, state, batch)    # a step where policy != reference
    if name == "four":
      assert len(jax.tree.leaves(state["params"])[0].sharding.device_set) == 4
    out[name] = (host(state["params"]), host(m))
  for other in ("four", "one_unsplit"):
    for key in out["one"][1]:
      np.testing.assert_allclose(out[other][1][key], out["one"][1][key], rtol=1e-5, atol=1e-6,
                                 err_msg=(other, key))
    for a, b in zip(jax.tree.leaves(out[other][0]), jax.tree.leaves(out["one"][0])):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=other)


def test_sigkill_resume_is_exact(files, tmp_path):
  from test_resume import assert_same_export, assert_same_metrics, kill_and_resume
  args = ["configs/dpo.py", "--config.task=", f"--config.model.init_from={files['base']}",
          f"--config.data.train.path={files['rankings']}",
          f"--config.data.eval.path={files['rankings_eval']}", "--config.train.steps=12",
          "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.ckpt_every=2", "--config.train.eval_every=4",
          "--config.train.eval_batches=2", "--config.data.max_prompt_len=8",
          "--config.data.max_len=16", "--config.optim.lr=3e-3", "--config.dpo.beta=0.3"]
  ref_dir, cut_dir, _ = kill_and_resume(tmp_path, args, "dpo")
  assert_same_metrics(ref_dir, cut_dir)
  assert_same_export(ref_dir, cut_dir, "policy")
  rows = helpers.read_metrics(ref_dir)
  assert all(r["stage"] == "dpo" for r in rows)
  assert sum("eval/accuracy" in r for r in rows) == 3 and "eval/chosen_rewards" in rows[-1]


@pytest.mark.parametrize("field,value,needle", [
    ("dpo.beta", 0.0, "dpo.beta"), ("dpo.rankings", "pairs", "dpo.rankings"),
    ("dpo.loss", "ipo", "dpo.loss"),                      # IPO needs all_pairs
    ("dpo.label_smoothing", 0.1, "dpo.label_smoothing"),  # ... and so does cDPO
    ("dpo.k_max", 1, "dpo.k_max"), ("model.init_from", "", "model.init_from")])
def test_bad_dpo_settings_name_the_field(tmp_path, field, value, needle):
  from rlhf_jax.errors import ConfigError
  c = config_lib.dpo_config()
  c.task, c.data.train.path, c.model.init_from = "", "user/dataset", str(tmp_path)
  config_lib.validate(c)
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    config_lib.validate(c)


# ------------------------------------------------------------- the README commands


def readme_commands() -> list:
  text = open(os.path.join(helpers.REPO, "README.md")).read()
  section = text[text.index("## DPO: preference optimisation"):]
  section = section[:section.index("\n## ", 4)]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  return [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_dpo_commands_run_as_written(files, tmp_path):
  import transformers
  commands = readme_commands()
  assert len(commands) == 3 and "configs/dpo.py:tiny" in commands[0]
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "data"))
  for name, rows in (("rankings", ranking_rows(64)), ("rankings_eval", ranking_rows(32, 1)),
                     ("comparisons", pair_rows(64))):
    helpers.write_jsonl(os.path.join(root, "data", f"{name}.jsonl"), rows)
  env = helpers.launcher_env()
  for command in commands:
    argv = shlex.split(command.replace("/models/my_sft_model", files["base"]))
    argv = [sys.executable, os.path.join(helpers.REPO, argv[1])] + [
        a.replace("--config=configs/", f"--config={helpers.REPO}/configs/") for a in argv[2:]]
    proc = subprocess.run(argv + ["--config.train.progress=False"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, proc.stderr[-4000:])
  runs = os.path.join(root, "runs")
  # The built-in task: DPO from SFT on the oracle's rankings, evaluated against SFT.
  result = json.load(open(os.path.join(runs, "dpo_smoke", "eval.json")))
  assert result["method"] == "dpo" and 0.0 <= result["oracle_win_rate"] <= 1.0
  assert np.isfinite(result["kl_to_sft"]) and result["rm_accuracy"] is None
  assert set(result["unsafe_rate"]) == {"sft", "dpo"} and "dpo" in result["alignment_tax"]
  assert not os.path.isdir(os.path.join(runs, "dpo_smoke", "rm"))   # no reward model
  assert os.path.isfile(os.path.join(runs, "dpo_smoke", "report.md"))
  # Your data: K-way rankings (Plackett–Luce) and pairs (IPO); exports load in transformers.
  for run in ("dpo", "dpo_ipo"):
    rows = helpers.read_metrics(os.path.join(runs, run))
    assert rows and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    transformers.AutoModelForCausalLM.from_pretrained(os.path.join(runs, run, "export",
                                                                   "policy"))
  assert any("eval/loss" in r for r in helpers.read_metrics(os.path.join(runs, "dpo")))
