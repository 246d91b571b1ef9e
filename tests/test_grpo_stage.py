"""The GRPO stage (GRPO, Dr. GRPO, RLOO, REINFORCE++): references, sharding, launcher, resume.

- One rollout + one update of each estimator against a float64 reference written from the
  papers with explicit loops (never calling `rlhf_jax.losses`): the score (normalised RM
  + weighted reward-function score − the no-EOS penalty), the advantages (Shao et al. 2024
  §4.1.2 with the unbiased group std + 1e-6; Dr. GRPO without the std; RLOO's
  leave-one-out mean, Ahmadian et al. 2024; REINFORCE++'s undiscounted returns of
  −β·k1 + score, whitened over the batch's valid tokens, Hu 2025) and the loss at moved
  params (clipped surrogate + β·k3 to the reference, eq. 3-4; no KL term for REINFORCE++),
  token-level or per-sequence means. Temperature 0.7 and coefficients ≠ 1 make a dropped
  temperature / ignored coefficient visible.
- A group of identical rewards gives zero advantage, so with β = 0 the update leaves the
  policy exactly as it was (Adam's first step of a zero gradient is 0).
- The build's rollout scoring and update on 8 fake devices ((8,1,1), (2,2,2)) equal one
  device (tolerances as tests/test_scale_out.py).
- Through the launcher: the built-in pipeline on `configs/grpo.py:tiny` (pretrain -> sft ->
  rm -> grpo + eval.json); user data (tiny HF Llama, prompts, an RM and a reward function)
  SIGKILLed after its first checkpoint resumes to the same metrics and export, which
  transformers loads.

Tolerance: rtol 1e-5 / atol 2e-6 as tests/test_ppo_reference.py (float32 of O(1) values).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import models, optim, sharding
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import grpo, model_init, ppo
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=1, eos_token_id=1,
                                        pad_token_id=0)
EOS, PAD = 1, 0
G, B, P, N = 4, 8, 6, 6           # 2 prompts x 4 samples
TEMPERATURE, KL_COEF = 0.7, 0.1
NORM = dict(mean=0.25, std=2.0, gain=True)
RM_W, FN_W, NO_EOS = 0.8, 1.5, 0.7
RTOL, ATOL = 1e-5, 2e-6
MESH1 = dict(data=1, fsdp=1, tensor=1)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _perturb(params, scale, seed):
  rng = np.random.default_rng(seed)

  def f(x):
    x = np.asarray(x)
    if x.ndim < 2:
      return x
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64)))
    return (x + scale * rms * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree.map(f, params)


def _batch():
  """Two prompts, each repeated G times (consecutive), with every end-of-response case."""
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, CFG.vocab_size, 5), rng.integers(3, CFG.vocab_size, 3)]
  # (response length, EOS index or None) per row
  rows = [(3, 2), (6, 5), (6, None), (1, 0),
          (0, None), (3, None), (4, 3), (6, None)]
  pids = np.full((B, P), PAD, np.int32)
  pmask = np.zeros((B, P), np.int32)
  tokens = np.full((B, N), PAD, np.int32)
  rmask = np.zeros((B, N), np.int32)
  for b, (rlen, eos_at) in enumerate(rows):
    prompt = prompts[b // G]
    pids[b, P - len(prompt):] = prompt
    pmask[b, P - len(prompt):] = 1
    tokens[b, :rlen] = rng.integers(3, CFG.vocab_size, rlen)
    rmask[b, :rlen] = 1
    if eos_at is not None:
      tokens[b, eos_at] = EOS
  tokens[5, 4] = EOS   # in a padded slot: not an emitted EOS
  return dict(prompt_ids=pids, prompt_mask=pmask, tokens=tokens, response_mask=rmask)


BATCH = _batch()
FN_SCORES = np.array([0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -0.5, 3.0], np.float32)
REF = _host(models.init(CFG, jax.random.PRNGKey(1), kind="causal"))
POLICY = _perturb(REF, 0.5, seed=10)          # π_old ≠ π_ref: KL ≠ 0
POLICY_NEW = _perturb(POLICY, 1.0, seed=11)   # the update starts elsewhere: ρ ≠ 1, clipping
REWARD = _host(models.init(CFG, jax.random.PRNGKey(3), kind="scalar"))


def _cfg(estimator, **ppo_overrides):
  c = config_lib.grpo_config()
  c.grpo.estimator, c.grpo.group_size = estimator, G
  p = c.ppo
  p.temperature, p.kl_coef, p.no_eos_penalty = TEMPERATURE, KL_COEF, NO_EOS
  p.reward_model_weight, p.reward_fn_weight = RM_W, FN_W
  p.epochs, p.minibatches, p.clip_eps, p.max_new_tokens = 1, 1, 0.2, N
  for k, v in ppo_overrides.items():
    p[k] = v
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, schedule="constant", final_lr_frac=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-6, grad_clip=1.0))
  c.train.batch_size = B // G
  return c


# ------------------------------------------------- the code under test (repoint here)


class Code:
  """The jitted rollout scoring and update of one config, compiled once."""

  def __init__(self, c):
    self.rollout = jax.jit(grpo.make_rollout_fn(CFG, CFG, c.ppo, c.grpo, NORM, EOS, P, G))
    tx = optim.make_optimizer(c.optim, 10)
    mesh = sharding.make_mesh(MESH1, devices=jax.devices()[:1])
    self.shard = state_lib.model_shardings(mesh, CFG, "causal", dict(sharding.DEFAULT_RULES))
    self.tx = tx
    self.update = jax.jit(grpo.make_update_fn(CFG, c.ppo, c.grpo, tx, P, use_ptx=False))
    self.mesh = mesh

  def run_rollout(self, fn_scores=FN_SCORES, policy=POLICY):
    rollout, metrics = self.rollout(
        policy, REF, REWARD, BATCH["prompt_ids"], BATCH["prompt_mask"], BATCH["tokens"],
        BATCH["response_mask"], jnp.asarray(fn_scores))
    return rollout, _host(metrics)

  def run_update(self, rollout, start=POLICY_NEW):
    """One `update` (epochs = minibatches = 1) from `start`; (metrics, new policy)."""
    _, init_state, _ = state_lib.build(self.mesh, 0, {
        "policy": (state_lib.place(start, self.shard), self.shard, self.tx)})
    new, metrics = self.update(init_state(), rollout, jnp.zeros((1,)), jax.random.PRNGKey(7))
    assert int(new["total_skips"]) == 0
    return _host(metrics), _host(new["policy"])


# ------------------------------------------------------------- float64 references


@functools.lru_cache(maxsize=None)
def _logprobs(name):
  return ref_logprobs({"policy": POLICY, "ref": REF, "new": POLICY_NEW}[name])


def ref_logprobs(params):
  ids = np.concatenate([BATCH["prompt_ids"], BATCH["tokens"]], axis=1)
  mask = np.concatenate([BATCH["prompt_mask"], BATCH["response_mask"]], axis=1)
  logits = np.asarray(models.logits(CFG, params, ids, mask), np.float64)
  out = np.zeros((B, N))
  for b in range(B):
    for t in range(N):
      z = logits[b, P - 1 + t] / TEMPERATURE
      lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
      out[b, t] = z[ids[b, P + t]] - lse
  return out


def ref_scores(fn_scores):
  ids = np.concatenate([BATCH["prompt_ids"], BATCH["tokens"]], axis=1)
  mask = np.concatenate([BATCH["prompt_mask"], BATCH["response_mask"]], axis=1)
  head = np.asarray(models.values(CFG, REWARD, ids, mask), np.float64)
  m = BATCH["response_mask"]
  scores = np.zeros(B)
  for b in range(B):
    n = int(m[b].sum())
    raw = head[b, P - 1 + n]       # the last response token (the prompt's end if empty)
    scores[b] = RM_W * (raw - NORM["mean"]) / NORM["std"] + FN_W * float(fn_scores[b])
    if not any(BATCH["tokens"][b, t] == EOS for t in range(N) if m[b, t]):
      scores[b] -= NO_EOS
  return scores


def ref_advantages(estimator, scores, old, refl):
  m = BATCH["response_mask"]
  adv = np.zeros((B, N))
  if estimator == "reinforce_pp":
    for b in range(B):
      valid = [t for t in range(N) if m[b, t]]
      ret = 0.0
      for t in reversed(valid):
        ret += -KL_COEF * (old[b, t] - refl[b, t]) + (scores[b] if t == valid[-1] else 0.0)
        adv[b, t] = ret
    flat = [adv[b, t] for b in range(B) for t in range(N) if m[b, t]]
    mu = sum(flat) / len(flat)
    var = sum((x - mu) ** 2 for x in flat) / len(flat)
    return (adv - mu) / np.sqrt(var + 1e-8) * m
  for g in range(B // G):
    r = scores[g * G:(g + 1) * G]
    for i in range(G):
      b = g * G + i
      if estimator == "rloo":
        a = r[i] - (sum(r) - r[i]) / (G - 1)
      else:
        a = r[i] - sum(r) / G
        if estimator == "grpo":
          a /= np.sqrt(sum((x - sum(r) / G) ** 2 for x in r) / (G - 1)) + 1e-6
      adv[b] = a * m[b]
  return adv


def ref_loss(estimator, adv, old, refl, new, length_norm):
  m = BATCH["response_mask"]
  beta = 0.0 if estimator == "reinforce_pp" else KL_COEF
  eps = 0.2
  per_tok = np.zeros((B, N))
  pg_tok = np.zeros((B, N))
  for b in range(B):
    for t in range(N):
      if m[b, t]:
        ratio = np.exp(new[b, t] - old[b, t])
        a = adv[b, t]
        pg_tok[b, t] = -min(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
        d = refl[b, t] - new[b, t]           # k3 = π_ref/π − log(π_ref/π) − 1
        per_tok[b, t] = pg_tok[b, t] + beta * (np.exp(d) - d - 1)
  if length_norm == "token":
    return per_tok.sum() / m.sum(), pg_tok.sum() / m.sum()
  rows = [b for b in range(B) if m[b].sum()]
  return (np.mean([per_tok[b].sum() / m[b].sum() for b in rows]),
          np.mean([pg_tok[b].sum() / m[b].sum() for b in rows]))


# --------------------------------------------------------------------------- tests

CASES = [("grpo", "token"), ("dr_grpo", "token"), ("rloo", "sequence"),
         ("reinforce_pp", "token")]


@pytest.mark.parametrize("estimator,length_norm", CASES)
def test_one_update_of_each_estimator_matches_float64_reference(estimator, length_norm):
  c = _cfg(estimator)
  c.grpo.length_norm = length_norm
  code = Code(c)
  rollout, metrics = code.run_rollout()
  got = _host(rollout._asdict())
  m = BATCH["response_mask"]
  old, refl = _logprobs("policy"), _logprobs("ref")
  scores = ref_scores(FN_SCORES)
  np.testing.assert_allclose(got["scores"], scores, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got["old_logprobs"] * m, old * m, rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(got["ref_logprobs"] * m, refl * m, rtol=RTOL, atol=1e-5)
  adv = ref_advantages(estimator, scores, old, refl)
  np.testing.assert_allclose(got["advantages"], adv, rtol=RTOL, atol=ATOL,
                             err_msg=f"{estimator} advantages")
  np.testing.assert_allclose(metrics["kl"], ((old - refl) * m).sum(1).mean(), rtol=RTOL,
                             atol=ATOL)
  train_metrics, _ = code.run_update(rollout)
  loss, pg = ref_loss(estimator, adv, old, refl, _logprobs("new"), length_norm)
  np.testing.assert_allclose(train_metrics["loss"], loss, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(train_metrics["policy_loss"], pg, rtol=RTOL, atol=ATOL)
  assert 0 < train_metrics["policy_clip_frac"] < 1   # clipping engaged on some tokens


def test_identical_rewards_in_a_group_give_no_policy_gradient():
  c = _cfg("grpo", kl_coef=0.0)   # the advantage term alone
  # One reward-function score per group; the RM and the no-EOS penalty would tell the
  # responses apart, so they are off: every reward in a group is identical.
  c.ppo.reward_model_weight = 0.0
  c.ppo.no_eos_penalty = 0.0
  code = Code(c)
  rollout, metrics = code.run_rollout(policy=POLICY_NEW,
                                      fn_scores=np.repeat(np.float32([1.5, -2.0]), G))
  assert np.all(np.asarray(rollout.advantages) == 0.0)
  assert metrics["flat_group_frac"] == 1.0
  _, new = code.run_update(rollout)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(POLICY_NEW)):
    np.testing.assert_array_equal(a, b)
  # Control: different rewards in a group do move the policy.
  rollout, _ = code.run_rollout(policy=POLICY_NEW)
  _, new = code.run_update(rollout)
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(new), jax.tree.leaves(POLICY_NEW))) > 1e-4


def test_repeat_prompts_keeps_each_prompts_samples_consecutive():
  host = dict(input_ids=np.arange(6).reshape(3, 2), row=np.array([7, 8, 9]))
  out = grpo.repeat_prompts(host, 3)
  np.testing.assert_array_equal(out["row"], [7, 7, 7, 8, 8, 8, 9, 9, 9])
  np.testing.assert_array_equal(out["input_ids"][3:6], [[2, 3]] * 3)


def test_config_errors_name_the_field():
  for field, value, expect in (("grpo.group_size", 1, "grpo.group_size"),
                               ("grpo.estimator", "ppo", "grpo.estimator"),
                               ("ppo.vf_coef", 0.5, "ppo.vf_coef"),
                               ("ppo.minibatches", 3, "ppo.minibatches")):
    bad = config_lib.grpo_config()
    bad.task = "default"
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(ConfigError, match=expect):
      config_lib.validate(bad)
  ok = config_lib.grpo_config()
  ok.grpo.estimator, ok.grpo.group_size = "reinforce_pp", 1   # no group baseline needed
  config_lib.validate(ok)


# ------------------------------------------------------------------- sharded = 1 device


def _run_sharded(shape):
  if shape == (1, 1, 1):
    mesh = sharding.make_mesh(MESH1, devices=jax.devices()[:1])
  else:
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  c = _cfg("grpo", minibatches=2, epochs=2, ptx_coef=0.5, ptx_batch_size=4)  # GRPO-ptx
  rules = dict(sharding.DEFAULT_RULES)
  m = ppo.Models(policy=model_init.place(mesh, rules, CFG, "causal", POLICY),
                 value=None, reward=model_init.place(mesh, rules, CFG, "scalar", REWARD),
                 normalization=NORM, eos_id=EOS, pad_id=PAD, stop_ids=(EOS,))
  parts = grpo.build(c, mesh, m, use_ptx=True)
  state = parts.init_state()
  batch = sharding.host_to_global(mesh, BATCH)
  rollout, metrics = parts.rollout_fn(P)(
      state["policy"], parts.models.policy.params, parts.models.reward.params,
      batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["response_mask"],
      sharding.host_to_global(mesh, FN_SCORES))
  ptx_ids = np.random.default_rng(5).integers(3, CFG.vocab_size, (8, 10)).astype(np.int32)
  ptx = sharding.host_to_global(mesh, dict(input_ids=ptx_ids, attention_mask=np.ones_like(
      ptx_ids), loss_mask=np.ones_like(ptx_ids)))
  new, train_metrics = parts.update_fn(P)(state, rollout, ptx, jax.random.PRNGKey(7))
  return _host(dict(metrics, **train_metrics)), _host(new["policy"]), _host(new["policy_opt"])


@pytest.fixture(scope="module")
def one_device():
  return _run_sharded((1, 1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_update_equals_one_device(shape, one_device):
  metrics, policy, opt = _run_sharded(shape)
  want_metrics, want_policy, want_opt = one_device
  assert sorted(metrics) == sorted(want_metrics) and want_metrics["ptx_loss"] > 0
  for k in metrics:
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(want_policy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(want_opt)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(want_policy), jax.tree.leaves(POLICY))) > 1e-4


# ------------------------------------------------------------------- through the launcher

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints (test extra)")

SECTION = "## GRPO, RLOO and REINFORCE++"
# Appended to the README's user-data commands: sizes for seconds on CPU (their defaults fit
# real models: 100 iterations of 32 prompts x G, 256 new tokens).
SMALL = ("--config.train.batch_size=2", "--config.ppo.minibatches=2",
         "--config.ppo.max_new_tokens=4", "--config.data.max_prompt_len=8",
         "--config.data.max_len=16", "--config.train.progress=False")


def readme_commands() -> list:
  """The commands of the README's GRPO section (```bash blocks, backslash lines joined)."""
  text = open(os.path.join(helpers.REPO, "README.md")).read()
  section = text[text.index(SECTION):]
  section = section[:section.index("\n## ", len(SECTION))]
  out = []
  for block in re.findall(r"```bash\n(.*?)```", section, re.S):
    out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
  return out


def _readme_root(tmp_path) -> str:
  """A user's directory: launch/ and configs/ of this checkout, a tiny random SFT model at
  models/my_sft_model, a tiny RM at runs/rm, data/prompts.jsonl and data/my_rewards.py."""
  import command_helpers
  root = str(tmp_path)
  os.makedirs(root, exist_ok=True)
  for d in ("launch", "configs"):
    os.symlink(os.path.join(helpers.REPO, d), os.path.join(root, d))
  helpers.tiny_hf_llama(os.path.join(root, "models", "my_sft_model"))
  command_helpers.tiny_reward_model(os.path.join(root, "runs", "rm"),
                                    normalization=dict(mean=0.1, std=1.0, gain=False))
  os.makedirs(os.path.join(root, "data"))
  helpers.write_jsonl(os.path.join(root, "data", "prompts.jsonl"),
                      [dict(prompt=r["prompt"]) for r in helpers.copy_rows(64)])
  with open(os.path.join(root, "data", "my_rewards.py"), "w") as f:
    f.write("def score(prompts, responses):\n"
            "  return [float(sum(w in p.split() for w in r.split()))\n"
            "          for p, r in zip(prompts, responses)]\n")
  return root


def _localised(command: str, root: str) -> list:
  """The README command's argv with its paths inside `root` (absolute)."""
  argv = shlex.split(command)
  assert argv[:2] == ["python", "launch/train.py"], command
  out = []
  for a in argv[2:]:
    a = a.replace("=/models/", f"={root}/models/").replace("=data/", f"={root}/data/")
    out.append(a.replace("=runs/", f"={root}/runs/"))
  return out


def _launch(argv: list, root: str):
  return subprocess.run([sys.executable, os.path.join(root, "launch", "train.py"), *argv],
                        capture_output=True, text=True, timeout=600, cwd=root,
                        env=helpers.launcher_env())


def test_readme_commands_are_the_ones_tested():
  commands = readme_commands()
  assert len(commands) == 3 and all("--config=configs/grpo.py" in c for c in commands)
  assert commands[0].endswith("--config=configs/grpo.py:tiny --workdir=runs/grpo_smoke")


def test_built_in_pipeline_trains_grpo_and_evaluates_it_against_sft(tmp_path):
  """README command 1: pretrain -> sft -> rm -> grpo on the built-in task, then eval."""
  root = str(tmp_path)
  for d in ("launch", "configs"):
    os.symlink(os.path.join(helpers.REPO, d), os.path.join(root, d))
  proc = _launch(_localised(readme_commands()[0], root) + ["--config.train.progress=False"],
                 root)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = os.path.join(root, "runs", "grpo_smoke")
  assert sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d))
                and not d.startswith(".")) == ["grpo", "pretrain", "rm", "sft", "task_data"]
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert result["method"] == "grpo"
  for key in ("oracle_win_rate", "kl_to_sft", "rm_accuracy"):
    assert np.isfinite(result[key]), key
  assert set(result["alignment_tax"]) == {"grpo"}
  assert set(result["unsafe_rate"]) == {"sft", "grpo"}
  rows = [r for r in helpers.read_metrics(os.path.join(workdir, "grpo")) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3] and {r["stage"] for r in rows} == {"grpo"}
  assert all(np.isfinite(r["loss"]) and 0 <= r["flat_group_frac"] <= 1 for r in rows)


def test_readme_reward_model_command_exports_what_transformers_loads(tmp_path):
  """README command 2: GRPO (G = 8) against a reward model on the user's prompts."""
  root = _readme_root(tmp_path)
  proc = _launch(_localised(readme_commands()[1], root) + ["--config.ppo.iterations=2",
                                                           *SMALL], root)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = os.path.join(root, "runs", "grpo")
  train = [r for r in helpers.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(r["stage"] == "grpo" and "rm_score" in r and "fn_score" not in r for r in train)
  assert "rollout_rows=16" in proc.stderr     # 2 prompts x grpo.group_size=8
  import transformers
  export = os.path.join(workdir, "export", "policy")
  hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  cfg, params = models.load_hf(export)
  ids = np.array([[2, 5, 6, 7, 8, 9]], np.int32)
  with torch.no_grad():
    want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(models.logits(cfg, params, ids, np.ones_like(ids)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_readme_reward_fn_command_resumes_exactly_after_sigkill(tmp_path):
  """README command 3 (RLOO on a reward function), SIGKILLed after its first checkpoint and
  rerun, ends with the metrics and export of an uninterrupted run (tests/test_resume.py)."""
  from test_resume import assert_same_export, assert_same_metrics, kill_and_resume
  root = _readme_root(tmp_path / "user")
  argv = [a for a in _localised(readme_commands()[2], root)
          if not a.startswith(("--config=", "--workdir="))]
  args = ["configs/grpo.py", *argv, *SMALL, "--config.ppo.iterations=6",
          f"--config.data.eval.path={root}/data/prompts.jsonl",
          "--config.train.log_every=1", "--config.train.ckpt_every=2",
          "--config.train.eval_every=3", "--config.train.eval_batches=1",
          "--config.train.sample_every=2", "--config.train.samples_logged=2",
          "--config.optim.lr=3e-3"]
  ref_dir, cut_dir, _ = kill_and_resume(tmp_path, args, "rloo")
  assert_same_metrics(ref_dir, cut_dir)
  assert_same_export(ref_dir, cut_dir, "policy")
  rows = helpers.read_metrics(ref_dir)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all(r["stage"] == "grpo" and "fn_score" in r for r in train)
  assert any("eval/score" in r for r in rows)
  with open(os.path.join(ref_dir, "samples.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 3 * 2 and {s["stage"] for s in samples} == {"grpo"}
