"""`ppo.reward_fn`: a Python function as PPO's reward, alone or added to the reward model's.

Oracles: the combined score is recomputed in float64 from its formula
(w_rm · (r − mean) / std + w_fn · f − penalty) with the RM's raw score from an independent
`models.scores` call; the function must receive the rows' own prompt and response text in
row order on an 8-device mesh; a PPO run whose only reward is a function the test defines
must raise that function's mean score by a measured margin with a bounded KL; a bad
function is one `error: ` line naming it, through the real launcher.
"""

from __future__ import annotations

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import models, reward_fns, sampling, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.trainers import model_init, ppo, ppo_experience
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=16, num_layers=1, eos_token_id=1,
                                        pad_token_id=0)
EOS, PAD = 1, 0
WORD = {w: i + 4 for i, w in enumerate(helpers.WORDS)}   # the word tokenizer's ids
RTOL, ATOL = 1e-5, 1e-5

# Learning from a reward function alone (see the test): measured margins.
# Seen over config.seed 0-5: the mean "good" count rose from 0.19..0.50 (first 2
# iterations) to 3.28..3.91 (last 2), a gain of +2.78..+3.44 (seed 0: 0.22 -> 3.31); the
# largest per-response KL was 6.0..7.9 nats (beta 0.1, 6 tokens).
FN_GAIN = 1.5
FN_KL_BOUND = 15.0

GOOD_FN = """
def good(prompts, responses):
  # +1 per word token "good" in the response
  return [r.split().count("good") for r in responses]
"""


def _write(path, source):
  with open(path, "w") as f:
    f.write(textwrap.dedent(source))
  return str(path)


# ------------------------------------------------------------------ loading and checking


def test_load_a_function_from_a_file_or_a_module(tmp_path, monkeypatch):
  path = _write(tmp_path / "rewards.py", GOOD_FN)
  fn = reward_fns.load(f"{path}:good")
  assert fn.spec == f"{path}:good"
  np.testing.assert_array_equal(fn(["p", "q"], ["good a good", "bad"]), [2.0, 0.0])
  _write(tmp_path / "my_reward_module.py", GOOD_FN)
  monkeypatch.syspath_prepend(str(tmp_path))
  fn = reward_fns.load("my_reward_module:good")
  np.testing.assert_array_equal(fn(["p"], ["good"]), [1.0])


@pytest.mark.parametrize("spec,needle", [
    ("{dir}/missing.py:good", "an existing Python file"),
    ("no_such_reward_module_xyz:good", "an importable module"),
    ("{dir}/rewards.py:nothing", "a function 'nothing'"),
    ("{dir}/rewards.py:CONSTANT", "to be callable"),
    ("{dir}/broken.py:good", "imports cleanly"),
    ("{dir}/rewards.py", "path/to/file.py:function"),
    ("{dir}/rewards.py:1x", "path/to/file.py:function"),
])
def test_what_cannot_be_loaded_is_a_config_error_naming_the_field(tmp_path, spec, needle):
  _write(tmp_path / "rewards.py", GOOD_FN + "\nCONSTANT = 3\n")
  _write(tmp_path / "broken.py", "raise RuntimeError('no\\nway')\n")
  spec = spec.format(dir=tmp_path)
  with pytest.raises(ConfigError) as e:
    reward_fns.load(spec)
  message = str(e.value)
  assert message.startswith(f"config.ppo.reward_fn={spec!r}") and needle in message, message
  assert "\n" not in message


def test_config_validation_checks_the_spec_and_the_file(tmp_path):
  c = config_lib.ppo_config()
  c.ppo.reward_fn = str(tmp_path / "missing.py") + ":good"
  with pytest.raises(ConfigError, match=r"config\.ppo\.reward_fn="):
    config_lib.validate(c)
  c.ppo.reward_fn = _write(tmp_path / "r.py", GOOD_FN) + ":good"
  config_lib.validate(c)
  for field in ("reward_fn_weight", "reward_model_weight"):
    c2 = config_lib.ppo_config()
    c2.ppo[field] = -1.0
    with pytest.raises(ConfigError, match=rf"config\.ppo\.{field}="):
      config_lib.validate(c2)


def _raises():
  raise KeyError("oops")


@pytest.mark.parametrize("returns,needle", [
    (lambda: [1.0], "returned 1 scores for 3 responses"),
    (lambda: [0.0, 1.0, float("nan")], "returned nan at row 2"),
    (lambda: [0.0, float("inf"), 1.0], "returned inf at row 1"),
    (lambda: [0.0, "high", 1.0], "returned 'high' (str) at row 1"),
    (lambda: [0.0, 1.0, None], "returned None (NoneType) at row 2"),
    (lambda: [0.0, True, 1.0], "returned True (bool) at row 1"),
    (lambda: "abc", "returned 'abc' (str)"),
    (lambda: 3.0, "returned 3.0 (float)"),
    (_raises, "raised KeyError: 'oops'"),
    (lambda: np.ones((3, 1)), "array of shape (3, 1)"),
], ids=["length", "nan", "inf", "str", "none", "bool", "str_whole", "scalar", "raises",
        "2d"])
def test_bad_return_values_are_one_line_user_errors_naming_the_function(returns, needle):
  rf = reward_fns.RewardFn("rewards.py:fn", lambda prompts, responses: returns())
  with pytest.raises(UserError) as e:
    rf(["a", "b", "c"], ["x", "y", "z"])
  message = str(e.value)
  assert message.startswith("ppo.reward_fn=rewards.py:fn ") and needle in message, message
  assert "\n" not in message


def test_numpy_and_integer_scores_are_accepted():
  rf = reward_fns.RewardFn("r.py:f", lambda p, r: np.array([1, 2], np.int32))
  np.testing.assert_array_equal(rf(["a", "b"], ["x", "y"]), [1.0, 2.0])
  rf = reward_fns.RewardFn("r.py:f", lambda p, r: (np.float32(0.5), 3))
  np.testing.assert_array_equal(rf(["a", "b"], ["x", "y"]), [0.5, 3.0])


def test_responses_are_decoded_up_to_the_stop_token():
  """A stop id may be plain text (a chat template's end of turn): the text ends before it."""
  tok = helpers.word_tokenizer()
  end_of_turn = WORD["="]
  tokens = np.array([[WORD["good"], WORD["a"], EOS, WORD["bad"]],
                     [WORD["b"], WORD["good"], WORD["c"], WORD["d"]],
                     [EOS, WORD["a"], PAD, PAD],
                     [WORD["e"], 2, WORD["a"], PAD],             # 2 = <bos>: special, skipped
                     [WORD["say"], end_of_turn, PAD, PAD]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
  got = reward_fns.response_texts(tok, tokens, mask, [EOS, end_of_turn])
  assert got == ["good a", "b good c", "", "e a", "say"]


# ------------------------------------------------------- the score: w_rm · RM + w_fn · f


def _params(kind, seed):
  params = jax.device_get(models.init(CFG, jax.random.PRNGKey(seed), kind=kind))
  if kind == "scalar":   # a zero head would score every row alike and hide a mix-up
    params["head"]["kernel"] = np.asarray(jax.random.normal(
        jax.random.PRNGKey(seed + 100), params["head"]["kernel"].shape)) * 0.5
    params["head"]["bias"] = np.full_like(np.asarray(params["head"]["bias"]), 0.3)
  return params


def _rollout(b=8, p=5, n=4, seed=0):
  """Left-padded prompts and right-padded responses of word ids; some rows end at EOS."""
  rng = np.random.default_rng(seed)
  pids = np.full((b, p), PAD, np.int32)
  pmask = np.zeros((b, p), np.int32)
  tokens = np.full((b, n), PAD, np.int32)
  rmask = np.zeros((b, n), np.int32)
  for i in range(b):
    lp = int(rng.integers(2, p + 1))
    pids[i, p - lp:] = rng.integers(4, 14, lp)
    pmask[i, p - lp:] = 1
    ln = int(rng.integers(1, n + 1))
    tokens[i, :ln] = rng.integers(4, 14, ln)
    if i % 2:
      tokens[i, ln - 1] = EOS
    rmask[i, :ln] = 1
  return pids, pmask, tokens, rmask


def _ppo_cfg(**fields):
  p = config_lib.ppo_config().ppo
  p.no_eos_penalty = 0.5
  for k, v in fields.items():
    p[k] = v
  return p


def _raw_scores(reward, pids, pmask, tokens, rmask):
  ids = np.concatenate([pids, tokens], 1)
  mask = np.concatenate([pmask, rmask], 1)
  last = pids.shape[1] - 1 + rmask.sum(1)
  return np.asarray(models.scores(CFG, reward, ids, mask, last.astype(np.int32)), np.float64)


def _want_scores(raw, fn, rmask, tokens, norm, w_rm, w_fn, penalty):
  """The formula, in float64: w_rm · (raw − mean) / std + w_fn · fn − penalty (no EOS)."""
  rm = 0.0 if raw is None else (raw - norm["mean"]) / (norm["std"] if norm["gain"] else 1.0)
  fn = 0.0 if fn is None else np.asarray(fn, np.float64)
  finished = np.any((tokens == EOS) & (rmask > 0), axis=1)
  return w_rm * rm + w_fn * fn - penalty * (~finished)


@pytest.mark.parametrize("w_rm,w_fn", [(0.7, 1.3), (1.0, 0.0), (0.0, 2.5)])
def test_experience_score_is_the_weighted_sum_of_rm_and_function(w_rm, w_fn):
  pids, pmask, tokens, rmask = _rollout()
  policy, value, reward = _params("causal", 0), _params("scalar", 1), _params("scalar", 2)
  norm = dict(mean=0.4, std=1.7, gain=True)
  fn_scores = np.random.default_rng(3).normal(size=8).astype(np.float32) * 2
  p = _ppo_cfg(reward_model_weight=w_rm, reward_fn_weight=w_fn)
  fn = jax.jit(ppo_experience.make_experience_fn(CFG, CFG, CFG, p, norm, EOS, 5))
  exp, m = fn(policy, policy, value, reward, jnp.float32(0.1), pids, pmask, tokens, rmask,
              jnp.asarray(fn_scores))
  raw = _raw_scores(reward, pids, pmask, tokens, rmask)
  want = _want_scores(raw, fn_scores, rmask, tokens, norm, w_rm, w_fn, 0.5)
  np.testing.assert_allclose(np.asarray(exp.scores), want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(m["score"]), want.mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(m["fn_score"]), fn_scores.astype(np.float64).mean(),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(m["raw_score"]), raw.mean(), rtol=RTOL, atol=ATOL)
  # The score is the reward at each response's last token: Σ_t rewards = score − β·Σ KL.
  kl = (np.asarray(exp.old_logprobs) - np.asarray(exp.ref_logprobs)) * rmask
  np.testing.assert_allclose(np.asarray(exp.kls), kl.sum(1), atol=ATOL)


def test_experience_without_a_reward_model_scores_the_function_alone():
  pids, pmask, tokens, rmask = _rollout(seed=1)
  policy, value = _params("causal", 0), _params("scalar", 1)
  fn_scores = np.arange(8, dtype=np.float32) - 3.0
  p = _ppo_cfg(reward_fn_weight=1.5)
  fn = jax.jit(ppo_experience.make_experience_fn(CFG, CFG, None, p,
                                                 dict(workdir_lib.NO_NORMALIZATION), EOS, 5))
  exp, m = fn(policy, policy, value, None, jnp.float32(0.1), pids, pmask, tokens, rmask,
              jnp.asarray(fn_scores))
  want = _want_scores(None, fn_scores, rmask, tokens, None, 0.0, 1.5, 0.5)
  np.testing.assert_allclose(np.asarray(exp.scores), want, rtol=RTOL, atol=ATOL)
  assert "raw_score" not in m and "fn_score" in m


def test_host_scoring_gives_each_row_its_own_text_and_score_on_8_devices():
  """Through `ppo.experience` on a data=8 mesh: the function sees each row's dataset
  prompt and decoded response in row order, and each row's score is its own."""
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  assert sharding.batch_shards(mesh) == 8
  tok = helpers.word_tokenizer()
  pids, pmask, tokens, rmask = _rollout(seed=2)
  prompts = [f"prompt number {i}" for i in range(8)]      # what the dataset held per row
  seen = {}

  def fn(ps, rs):
    seen.update(prompts=list(ps), responses=list(rs))
    return [10.0 * (prompts.index(p) if p in prompts else 0) + r.split().count("good")
            for p, r in zip(ps, rs)]

  c = config_lib.ppo_config()
  c.train.batch_size, c.ppo.minibatches, c.ppo.ptx_coef = 8, 1, 0.0
  c.ppo.reward_model_weight, c.ppo.reward_fn_weight, c.ppo.no_eos_penalty = 0.6, 0.8, 0.5
  rules = state_lib.parse_rules("")
  place = lambda kind, params: model_init.place(mesh, rules, CFG, kind, params)  # noqa: E731
  norm = dict(mean=-0.2, std=1.0, gain=False)
  reward = _params("scalar", 2)
  m = ppo.Models(policy=place("causal", _params("causal", 0)),
                 value=place("scalar", _params("scalar", 1)), reward=place("scalar", reward),
                 normalization=norm, eos_id=EOS, pad_id=PAD, stop_ids=(EOS,),
                 reward_fn=reward_fns.RewardFn("test:fn", fn), tokenizer=tok)
  parts = ppo.build(c, mesh, m, use_ptx=False)
  state = parts.init_state()
  batch = sharding.host_to_global(mesh, dict(input_ids=pids, attention_mask=pmask))
  out = sampling.GenerateOutput(*sharding.host_to_global(
      mesh, (tokens, np.zeros(tokens.shape, np.float32), rmask)))
  exp, metrics, scored = ppo.experience(parts, state["policy"], state["value"],
                                        jnp.float32(0.1), batch, out, prompts)
  want_responses = reward_fns.response_texts(tok, tokens, rmask, [EOS])
  assert seen == dict(prompts=prompts, responses=want_responses)
  fn_want = [10.0 * i + r.split().count("good") for i, r in enumerate(want_responses)]
  raw = _raw_scores(reward, pids, pmask, tokens, rmask)
  want = _want_scores(raw, fn_want, rmask, tokens, norm, 0.6, 0.8, 0.5)
  np.testing.assert_allclose(np.asarray(exp.scores), want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(scored.host_scores, fn_want)
  assert "time_reward_fn" in metrics
  # Without dataset text, the prompts are decoded from their tokens.
  exp2, _, _ = ppo.experience(parts, state["policy"], state["value"], jnp.float32(0.1),
                              batch, out, None)
  decoded = tok.batch_decode([r[k > 0].tolist() for r, k in zip(pids, pmask)],
                             skip_special_tokens=True)
  assert seen["prompts"] == decoded


# ------------------------------------------------------------- through the launcher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints (test extra)")
  d = tmp_path_factory.mktemp("rf")
  return dict(
      base=helpers.tiny_hf_llama(str(d / "base")),
      prompts=helpers.write_jsonl(str(d / "prompts.jsonl"),
                                  [dict(prompt=r["prompt"]) for r in helpers.copy_rows(64)]),
      good=_write(d / "good.py", GOOD_FN),
      bad=_write(d / "bad.py", """
          import os
          def bad(prompts, responses):
            mode = os.environ["BAD_MODE"]
            if mode == "raise":
              raise ValueError("the judge is down")
            scores = [1.0] * len(responses)
            if mode == "length":
              return scores[:-1]
            if mode == "nan":
              scores[3] = float("nan")
            if mode == "string":
              scores[2] = "high"
            return scores
          """))


def _ppo_args(files, *extra):
  return ["configs/ppo.py", "--config.task=", f"--config.model.init_from={files['base']}",
          f"--config.data.train.path={files['prompts']}", "--config.ppo.ptx_coef=0",
          "--config.train.batch_size=16", "--config.ppo.minibatches=2",
          "--config.ppo.max_new_tokens=6", "--config.data.max_prompt_len=8",
          "--config.data.max_len=16", "--config.data.bucket_min_len=2",
          "--config.ppo.no_eos_penalty=0", *extra]


def _assert_ok(proc):
  assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def test_a_reward_function_alone_raises_its_score_with_bounded_kl(files, tmp_path):
  """No reward model: +1 per "good" in the response is PPO's only reward. From a random
  tiny Llama, its mean must rise by FN_GAIN (first 2 iterations vs last 2) while the KL
  to the starting policy stays under FN_KL_BOUND; the value model is exported."""
  config, *args = _ppo_args(files, f"--config.ppo.reward_fn={files['good']}:good",
                            "--config.ppo.iterations=16", "--config.optim.lr=3e-3",
                            "--config.ppo.kl_coef=0.1", "--config.train.sample_every=8")
  workdir = str(tmp_path / "ppo")
  proc = helpers.run_launcher(config, workdir, *args)
  _assert_ok(proc)
  rows = [r for r in helpers.read_metrics(workdir) if "fn_score" in r]
  assert len(rows) == 16 and "raw_score" not in rows[0]
  first = np.mean([r["fn_score"] for r in rows[:2]])
  last = np.mean([r["fn_score"] for r in rows[-2:]])
  max_kl = max(r["kl"] for r in rows)
  print(f"[reward fn alone] mean 'good' count {first:.3f} -> {last:.3f}, max KL {max_kl:.3f}")
  assert last > first + FN_GAIN, [r["fn_score"] for r in rows]
  assert max_kl < FN_KL_BOUND, [r["kl"] for r in rows]
  for r in rows:   # the function is the whole score (weight 1, no penalty)
    np.testing.assert_allclose(r["score"], r["fn_score"], rtol=1e-6)
  assert os.path.isfile(os.path.join(workdir, "export", "policy", "config.json"))
  assert os.path.isfile(os.path.join(workdir, "export", "value_model", "config.json"))


@pytest.mark.parametrize("mode,needle", [
    ("length", "returned 15 scores for 16 responses"),
    ("nan", "returned nan at row 3"),
    ("string", "returned 'high' (str) at row 2"),
    ("raise", "raised ValueError: the judge is down"),
])
def test_a_bad_reward_function_is_one_error_line_naming_it(files, tmp_path, mode, needle):
  config, *args = _ppo_args(files, f"--config.ppo.reward_fn={files['bad']}:bad",
                            "--config.ppo.iterations=2", "--config.ppo.max_new_tokens=2")
  proc = helpers.run_launcher(config, str(tmp_path / "w"), *args,
                              env_extra=dict(BAD_MODE=mode))
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error: " in line]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith(f"error: ppo.reward_fn={files['bad']}:bad "), errors
  assert needle in errors[0], errors


def test_a_missing_function_stops_before_any_model_loads(files, tmp_path):
  config, *args = _ppo_args(files, f"--config.ppo.reward_fn={files['good']}:nope")
  proc = helpers.run_launcher(config, str(tmp_path / "w"), *args)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error: " in line]
  assert len(errors) == 1 and "config.ppo.reward_fn=" in errors[0], proc.stderr[-2000:]
  assert "a function 'nope'" in errors[0]
  assert "[ppo] prompts" not in proc.stderr and "[ppo] mesh" not in proc.stderr
  # Neither a reward model nor a function: named at start-up too.
  config, *args = _ppo_args(files)
  proc = helpers.run_launcher(config, str(tmp_path / "w2"), *args)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "config.ppo.reward_from=''" in proc.stderr and "ppo.reward_fn" in proc.stderr
