"""PPO trained from the command line reaches the closed-form KL-regularised optimum.

For a one-token response y to a fixed prompt x, InstructGPT eq. 2's per-token reward
(−β·log(π/π_ref) on the token, plus the RM score r(y) at the last token, γ = 1) makes PPO
maximise

    J(π) = E_{y~π}[r(y)] − β·KL(π ‖ π_ref),

whose maximiser over all distributions is (Ziegler et al. 2019; Rafailov et al. 2023 eq. 4)

    π*(y) = π_ref(y)·exp(r(y)/β) / Z,     Z = Σ_y π_ref(y)·exp(r(y)/β),

because J(π) = β·log Z − β·KL(π ‖ π*). The oracle is this formula, computed from the saved
SFT policy's logits and a reward vector r the test picks; the RM is built by hand so that
its score is exactly r(y) whatever the prompt. The test separates π* from what the usual
mistakes converge to:

  * β off by 2×: π_{2β} ∝ π_ref·exp(r/(2β)) (and β/2: π_{β/2} ∝ π_ref·exp(2r/β));
  * the reference log-prob with the wrong sign, reward r − β·(log π + log π_ref): the
    stationary condition r(y) − β·log π(y) − β·log π_ref(y) = const gives
    π_inv ∝ π_ref⁻¹·exp(r/β) (a true maximiser: J becomes concave in π with an entropy term);
  * the whole KL term with the wrong sign, reward r + β·log(π/π_ref): the stationary
    condition r(y) + β·log(π(y)/π_ref(y)) = const gives π_neg ∝ π_ref·exp(−r/β). That J is
    convex in π, so π_neg is its MINIMUM and PPO runs away from it towards a one-hot policy
    (with that sign flipped in `kl_penalized_rewards`, this run ends one-hot on ":" at
    TV 0.88 from π*; with kl_coef doubled in the experience it ends at TV 0.0016 from π_{2β}
    and 0.30 from π*);
  * no training at all: π_ref.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import helpers
from rlhf_jax import data, models

pytest.importorskip("transformers", reason="the launcher reads HF tokenizers")

BETA = 0.5
PROMPT = "say : a b ="
N_PROMPTS = 64
# π_ref's logits at the prompt (written into the policy's unembedding) and the RM score of
# each response token y = 0..13 (<pad> <eos> <bos> <unk> a b c d e good bad say : =). The
# special tokens get little π_ref mass; among the words π_ref and r are anti-correlated, so
# π* moves most of π_ref's mass, and r spans 0..4β.
REF_LOGITS = np.array([-2.0, -2.0, -2.0, -2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.0, 0.5, -0.5,
                       1.0], np.float32)
REWARD = np.array([0.0, 0.5, 0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 1.0, 0.5, 0.0, 1.5, 0.0],
                  np.float32)
# The norm of the RM's hand-set embedding rows: 8 = sqrt(hidden_size) makes their RMS 1, so
# the RMSNorm divides by sqrt(1 + eps) only (a 5e-7 relative change of the score).
EMBED_SCALE = 8.0
# 150 iterations of 64 samples (4 minibatches × 2 epochs, lr 1e-2 decaying to 5e-4) leave
# TV(π, π*) = 0.004..0.007 over 7 seeds (sampling noise of the last rollouts' gradients);
# τ = 0.03 is 4× that, yet every wrong target is >= 0.29 = 10τ from π* (and a β off by
# only 10% would already land 0.05 away).
ITERATIONS = 150
TAU = 0.03
# Measured |mean of the last 10 logged reward_total − β·log Z| = 0.0007; logging with 2β
# would give 0.64 and π_ref's J is 0.44 (β·log Z = 0.876).
TOL_J = 0.01


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def _tv(p, q) -> float:
  return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _prompt_ids(tok):
  # The word tokenizer adds no BOS (data.vocab's default policy follows the tokenizer), so
  # the trainer's prompt is exactly these ids; `_next_token_dist` is read on the same ids.
  ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
  assert tok(PROMPT)["input_ids"] == ids
  return np.asarray([ids], np.int32)


def _next_token_dist(model_dir, ids):
  """softmax(logits at the prompt's last position), temperature 1, of a saved causal LM."""
  cfg, params = models.load_hf(model_dir)
  logits = np.asarray(models.logits(cfg, params, ids, np.ones_like(ids)))[0, -1]
  return _softmax(logits)


def _base_cfg(tok):
  return models.get_preset("tiny").replace(
      vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
      bos_token_id=tok.bos_token_id)


def _make_policy(out_dir, tok, ids):
  """A random tiny causal LM whose logits at the prompt's last position are REF_LOGITS.

  Only the unembedding's component along the prompt's final hidden state h is replaced
  (K ← K − h(hᵀK)/|h|² + h·REF_LOGITSᵀ/|h|²), so the rest of the network, and every other
  position's logits, stay those of a random transformer.
  """
  import jax
  cfg = _base_cfg(tok)
  params = jax.tree.map(np.asarray, jax.device_get(models.init(cfg, 1, kind="causal")))
  h = np.asarray(models.hidden_states(cfg, params, ids, np.ones_like(ids)))[0, -1]
  k = params["lm_head"]["kernel"]
  hh = float(h @ h)
  params["lm_head"]["kernel"] = (k - np.outer(h, h @ k) / hh
                                 + np.outer(h, REF_LOGITS) / hh).astype(np.float32)
  models.save_hf(cfg, params, out_dir)
  tok.save_pretrained(out_dir)
  return out_dir


def _make_reward_model(out_dir, tok):
  """A scalar model with score(x, y) = REWARD[y] for the last token y, whatever x.

  Every block's output projections (attention `o`, MLP `down`) are zero, so each block adds
  nothing to the residual stream: the final hidden state at a position is RMSNorm of that
  token's embedding. Row y of the embedding is EMBED_SCALE·e_y (one-hot, hidden_size ≥
  vocab), which the norm maps to ≈ EMBED_SCALE·e_y, and the head reads REWARD[y] off it.
  """
  import jax
  cfg = _base_cfg(tok)
  v, d = cfg.vocab_size, cfg.hidden_size
  assert d >= v
  params = jax.tree.map(np.asarray, jax.device_get(models.init(cfg, 2, kind="scalar")))
  bb = params["backbone"]
  for i in range(cfg.num_layers):
    for block, proj in (("attn", "o"), ("mlp", "down")):
      out = bb[f"layer_{i}"][block][proj]
      out["kernel"] = np.zeros_like(out["kernel"])
  bb["embed"]["embedding"] = EMBED_SCALE * np.eye(v, d, dtype=np.float32)
  bb["final_norm"]["scale"] = np.ones((d,), np.float32)
  kernel = np.zeros((d, 1), np.float32)
  kernel[:v, 0] = REWARD / EMBED_SCALE
  params["head"] = {"kernel": kernel, "bias": np.zeros((1,), np.float32)}
  models.save_hf(cfg, params, out_dir, tokenizer=tok)
  tok.save_pretrained(out_dir)
  # Identity normalisation (workdir.RM_NORMALIZATION_FILE): PPO's score is r itself.
  with open(os.path.join(out_dir, "reward_normalization.json"), "w") as f:
    json.dump(dict(mean=0.0, std=1.0, gain=False, n=0), f)
  return out_dir


def _targets(pi_ref):
  """The optimum and the distributions the mistakes in the module docstring give."""
  logp = np.log(pi_ref)
  r = REWARD.astype(np.float64)
  return {
      "pi_star": _softmax(logp + r / BETA),
      "two_beta": _softmax(logp + r / (2 * BETA)),
      "half_beta": _softmax(logp + 2 * r / BETA),
      "inv_ref": _softmax(-logp + r / BETA),
      "neg_kl": _softmax(logp - r / BETA),
      "ref": pi_ref,
  }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("optimum")
  tok = helpers.word_tokenizer()
  ids = _prompt_ids(tok)
  policy = _make_policy(str(tmp / "policy"), tok, ids)
  reward = _make_reward_model(str(tmp / "rm"), tok)
  prompts = helpers.write_jsonl(str(tmp / "prompts.jsonl"),
                                [dict(prompt=PROMPT)] * N_PROMPTS)
  return dict(tmp=tmp, tok=tok, ids=ids, policy=policy, reward=reward, prompts=prompts)


def test_hand_built_models_give_the_intended_pi_ref_and_reward(setup):
  ids = setup["ids"]
  pi_ref = _next_token_dist(setup["policy"], ids)
  np.testing.assert_allclose(pi_ref, _softmax(REF_LOGITS), atol=1e-5)
  # The trainer's prompts (its own loader, rows as in the jsonl) are exactly these ids.
  loaded = data.load_prompts(data.DataSpec(path=setup["prompts"]), setup["tok"], ids.shape[1])
  np.testing.assert_array_equal(loaded.arrays["input_ids"], np.repeat(ids, N_PROMPTS, 0))
  assert np.all(loaded.arrays["attention_mask"] == 1)
  cfg, params = models.load_hf(setup["reward"])
  assert "head" in params
  v = cfg.vocab_size
  seqs = np.concatenate([np.repeat(ids, v, 0), np.arange(v, dtype=np.int32)[:, None]], 1)
  got = np.asarray(models.scores(cfg, params, seqs, np.ones_like(seqs),
                                 np.full((v,), ids.shape[1], np.int32)))
  np.testing.assert_allclose(got, REWARD, atol=1e-5)


def _run_ppo(setup, workdir):
  """PPO through launch/train.py: one-token responses at temperature 1, fixed β, no ptx."""
  n = setup["ids"].shape[1]
  proc = helpers.run_launcher(
      "configs/ppo.py", workdir, "--config.task=",
      f"--config.model.init_from={setup['policy']}",
      f"--config.ppo.reward_from={setup['reward']}",
      # The value model starts from the policy with a fresh head rather than from the RM:
      # the value is only a baseline (it does not move the fixed point), and this keeps the
      # hand-built RM, whose blocks are switched off, out of the trained model.
      f"--config.ppo.value_from={setup['policy']}",
      f"--config.data.train.path={setup['prompts']}",
      "--config.ppo.ptx_coef=0", "--config.ppo.max_new_tokens=1",
      f"--config.data.max_prompt_len={n}", f"--config.data.max_len={n + 1}",
      "--config.data.bucket_min_len=0", "--config.ppo.temperature=1.0",
      "--config.ppo.top_k=0", "--config.ppo.top_p=1.0",
      # The score is r(y) whether or not y is EOS (a one-token reply rarely is).
      "--config.ppo.no_eos_penalty=0",
      f"--config.ppo.kl_coef={BETA}", "--config.ppo.kl_controller=fixed",
      "--config.ppo.kl_kind=k1",
      f"--config.train.batch_size={N_PROMPTS}", "--config.ppo.minibatches=4",
      "--config.ppo.epochs=2", f"--config.ppo.iterations={ITERATIONS}",
      # A constant lr leaves the policy jittering around π* (TV 0.07..0.11 after 100
      # iterations at lr 1e-2, 3 seeds); a cosine decay to 5% lets it settle (see TAU).
      "--config.optim.lr=1e-2", "--config.optim.schedule=cosine",
      "--config.optim.final_lr_frac=0.05", "--config.optim.warmup_steps=0",
      "--config.ppo.ema_decay=0", f"--config.train.ckpt_every={ITERATIONS}",
      "--config.seed=0", timeout=600)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def test_ppo_converges_to_the_kl_regularised_optimum(setup):
  workdir = str(setup["tmp"] / "ppo")
  _run_ppo(setup, workdir)
  ids = setup["ids"]
  pi_ref = _next_token_dist(setup["policy"], ids)
  pi = _next_token_dist(os.path.join(workdir, "export", "policy"), ids)
  targets = _targets(pi_ref)
  star = targets.pop("pi_star")
  tv_star = _tv(pi, star)
  tvs = {k: _tv(pi, q) for k, q in targets.items()}
  sep = {k: _tv(star, q) for k, q in targets.items()}
  info = (f"TV(pi, pi*)={tv_star:.4f}; TV(pi, wrong)={tvs}; TV(pi*, wrong)={sep}\n"
          f"pi ={np.round(pi, 3)}\npi*={np.round(star, 3)}")
  # The design separates the optimum from every mistake by at least 3τ, so a policy within
  # τ of π* is at least 2τ away from each of them.
  assert min(sep.values()) >= 3 * TAU, info
  assert tv_star < TAU, info
  for k, d in tvs.items():
    assert d > TAU, f"{k}: {info}"
  # The logged per-sample total reward r(y) − β·log(π_old(y)/π_ref(y)) averages to
  # J(π_old) = β·log Z − β·KL(π_old ‖ π*): at the optimum it is β·log Z for EVERY sample, so
  # its batch mean over the last iterations sits within TOL_J of β·log Z once π ≈ π*.
  beta_log_z = BETA * float(np.log(np.sum(pi_ref * np.exp(REWARD / BETA))))
  rows = [r for r in helpers.read_metrics(workdir) if "reward_total" in r]
  assert len(rows) == ITERATIONS
  last = float(np.mean([r["reward_total"] for r in rows[-10:]]))
  assert abs(last - beta_log_z) < TOL_J, (last, beta_log_z, info)
