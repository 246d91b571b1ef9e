"""Divergence guards and validated inputs, mostly through the real launcher.

Each launcher test asserts the user-facing contract of DESIGN §6: a non-zero exit, one
`error: ...` line naming the field / file / row, and no Python traceback. The exact-resume,
SIGTERM and corrupted-checkpoint tests are in `test_resume.py`; the fuzz in
`test_launcher_fuzz.py`.
"""

from __future__ import annotations

import json
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import state as state_lib


def _assert_user_error(proc, *needles):
  assert proc.returncode not in (0, None), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
  assert "error: " in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr[-3000:])


# ---------------------------------------------------------------- config fields, in process


def _set(c, path, value):
  *parents, last = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[last] = value


# Fields any value of the right type is fine for, or checked when the stage opens them
# (paths: `launch` tests below; sharding_rules / presets: ConfigError from the trainer).
FREE = {"seed", "model.init_from", "tokenizer", "sharding_rules", "model.preset",
        "ppo.reward_from", "ppo.value_from"}


@pytest.mark.parametrize("make", [config_lib.sft_config, config_lib.rm_config,
                                  config_lib.ppo_config])
def test_every_numeric_and_choice_field_is_validated_by_name(make):
  """A negative / NaN number or an unknown choice in ANY field -> ConfigError naming it."""
  config_lib.validate(make())
  unchecked = []
  for path, value in helpers.config_leaves(make()):
    if path.startswith("pipeline.") or path in FREE or isinstance(value, bool):
      continue
    if path.endswith((".path", ".split")) or ".columns." in path:
      continue
    bads = ([-7] if isinstance(value, int) else [-7.0, math.nan]
            if isinstance(value, float) else ["\x00bogus"])
    for bad in bads:
      c = make()
      _set(c, path, bad)
      try:
        config_lib.validate(c)
      except ConfigError as e:
        assert f"config.{path}=" in str(e) and "expected" in str(e), (path, str(e))
      else:
        unchecked.append((path, bad))
  assert not unchecked


def test_guarded_update_skips_and_counts():
  """Reference semantics of a skipped update: params/optimiser kept, counters advanced."""
  old = dict(state_lib.scalar_state(0), params={"w": jnp.ones((3,))})
  new = dict(old, params={"w": jnp.full((3,), jnp.nan)}, step=old["step"] + 1,
             rng=jax.random.PRNGKey(1))
  out = state_lib.guarded(old, new, jnp.asarray(False))
  np.testing.assert_array_equal(out["params"]["w"], np.ones(3))
  assert (int(out["step"]), int(out["consecutive_skips"]), int(out["total_skips"])) == (1, 1, 1)
  out2 = state_lib.guarded(out, dict(out, params={"w": jnp.zeros((3,))}), jnp.asarray(True))
  np.testing.assert_array_equal(out2["params"]["w"], np.zeros(3))
  assert (int(out2["consecutive_skips"]), int(out2["total_skips"])) == (0, 1)


# ---------------------------------------------------------------- through the launcher


torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoints (test extra)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("rel")
  rows = helpers.copy_rows(32)
  return dict(base=helpers.tiny_hf_llama(str(d / "base")),
              small_vocab=helpers.tiny_hf_llama(str(d / "small_vocab"), vocab_size=8),
              sft=helpers.write_jsonl(str(d / "sft.jsonl"), rows),
              prompts=helpers.write_jsonl(str(d / "prompts.jsonl"),
                                          [dict(prompt=r["prompt"]) for r in rows]),
              dir=d)


def _sft(f, workdir, *extra, timeout=240):
  return helpers.run_launcher(
      "configs/sft.py", workdir, "--config.task=", f"--config.model.init_from={f['base']}",
      f"--config.data.train.path={f['sft']}", "--config.train.batch_size=8",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16", *extra, timeout=timeout)


def test_divergence_skips_counts_and_stops_with_clear_message(files, tmp_path):
  """A real trigger: lr=1e30 makes the weights overflow, so losses / grads go non-finite."""
  workdir = str(tmp_path / "w")
  proc = _sft(files, workdir, "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
              "--config.train.steps=40", "--config.train.log_every=100",
              "--config.train.ckpt_every=1", "--config.train.keep_checkpoints=40",
              "--config.train.max_consecutive_skips=3")
  _assert_user_error(proc, "3 non-finite updates in a row", "train.max_consecutive_skips=3",
                     "last good checkpoint")
  rows = helpers.read_metrics(workdir)
  last = rows[-1]   # written although log_every=100: the stopping step is always logged
  assert last["consecutive_skips"] == 3 and last["total_skips"] >= 3
  stopped = last["step"]
  assert stopped < 40
  assert not os.path.isdir(os.path.join(workdir, "export"))
  # The steps before the stop were checkpointed; nothing at the stopping step.
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert steps and steps[-1] == stopped - 1
  # The kept checkpoints hold finite params (a skipped update never reaches them).
  from rlhf_jax import checkpoint
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, _ = ckpt.restore(steps[-1])
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_unknown_field_and_ill_typed_override_are_one_line_errors(tmp_path):
  w = str(tmp_path / "w")
  _assert_user_error(helpers.run_launcher("configs/sft.py", w, "--config.train.nope=3",
                                          timeout=120), "--config.train.nope", "unknown")
  _assert_user_error(helpers.run_launcher("configs/ppo.py", w, "--config.nope=3",
                                          timeout=120), "--config.nope")
  _assert_user_error(helpers.run_launcher("configs/sft.py", w, "--config.train.steps=abc",
                                          timeout=120), "--config.train.steps=abc")
  _assert_user_error(helpers.run_launcher("configs/sft.py", w, "--config.optim.lr=fast",
                                          timeout=120), "--config.optim.lr=fast")
  _assert_user_error(helpers.run_launcher("configs/sft.py:huge", w, timeout=120),
                     "'huge'", "tiny")
  _assert_user_error(helpers.run_launcher("configs/nonexistent.py", w, timeout=120),
                     "nonexistent.py")
  _assert_user_error(helpers.run_launcher("configs/rm.py", w, "--config.optim.b2=1.5",
                                          timeout=120), "config.optim.b2=1.5")
  _assert_user_error(helpers.run_launcher("configs/ppo.py", w, "--config.ppo.kl_warn=-1",
                                          timeout=120), "config.ppo.kl_warn=-1")


def test_bad_row_error_names_file_and_row(files, tmp_path):
  rows = [json.loads(line) for line in open(files["sft"])]
  rows[5] = dict(prompt="say : a =")          # no completion
  path = helpers.write_jsonl(str(tmp_path / "bad.jsonl"), rows)
  proc = helpers.run_launcher(
      "configs/sft.py", str(tmp_path / "w"), "--config.task=",
      f"--config.model.init_from={files['base']}", f"--config.data.train.path={path}",
      "--config.data.train.on_bad_row=error", "--config.train.batch_size=8",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16", timeout=240)
  _assert_user_error(proc, "bad.jsonl", "row 5", "'completion'")
  assert not os.path.exists(os.path.join(str(tmp_path / "w"), "checkpoints"))


def test_tokenizer_model_vocab_mismatch_caught_before_training(files, tmp_path):
  workdir = str(tmp_path / "w")
  proc = helpers.run_launcher(
      "configs/sft.py", workdir, "--config.task=",
      f"--config.model.init_from={files['small_vocab']}",
      f"--config.data.train.path={files['sft']}", "--config.train.batch_size=8",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16", timeout=240)
  _assert_user_error(proc, "tokenizer has 14 tokens", "vocab_size=8")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def _other_tokenizer_model(out_dir):
  """A model like `base` whose tokenizer numbers the same words differently."""
  import tokenizers
  import transformers
  helpers.tiny_hf_llama(out_dir)
  specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
  vocab = {w: i for i, w in enumerate(specials + helpers.WORDS[::-1])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
      unk_token="<unk>").save_pretrained(out_dir)
  return out_dir


def test_policy_rm_tokenizer_mismatch_caught_before_training(files, tmp_path):
  rm_dir = _other_tokenizer_model(str(tmp_path / "rm"))
  workdir = str(tmp_path / "w")
  proc = helpers.run_launcher(
      "configs/ppo.py", workdir, "--config.task=", f"--config.model.init_from={files['base']}",
      f"--config.ppo.reward_from={rm_dir}", f"--config.data.train.path={files['prompts']}",
      "--config.ppo.ptx_coef=0", "--config.train.batch_size=8", "--config.ppo.minibatches=2",
      "--config.ppo.max_new_tokens=4", "--config.data.max_prompt_len=8",
      "--config.data.max_len=16", timeout=240)
  _assert_user_error(proc, "policy and reward model tokenizers", "differ")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
