"""Fuzz: malformed configs and overrides at `config.validate` and at the real launcher.

The contract (DESIGN §6): whatever the user passes, the launcher either trains cleanly
(exit 0) or exits non-zero with an `error: ...` message and no Python traceback — never a
traceback from inside JAX, never a hang (every subprocess runs under a timeout). Malformed
dataset rows are fuzzed at the loaders in `test_data_fuzz.py`.

Three layers, from cheap to dear:
  * `config.validate` in process, many examples: ConfigError or success, nothing else;
  * command lines that break at flag parsing (no JAX import, fast), many examples;
  * overrides of real fields with junk-ish values on a tiny SFT run, a few examples.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax.errors import ConfigError

MAKERS = {"sft": config_lib.sft_config, "rm": config_lib.rm_config,
          "ppo": config_lib.ppo_config}


FIELDS = {stage: [(p, type(v)) for p, v in helpers.config_leaves(make()) if not p.startswith("pipeline.")
                  and not p.endswith((".path", "init_from", "tokenizer", "reward_from",
                                      "value_from"))]
          for stage, make in MAKERS.items()}

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-12, 1e30, -1.0]))
ints = st.one_of(st.integers(-10, 10), st.integers(-2**40, 2**40))
strings = st.one_of(st.text(max_size=12),
                    st.sampled_from(["", "k1", "k3", "fixed", "adaptive", "bias", "none",
                                     "cosine", "error", "skip", "jsonl", "bfloat16",
                                     "embed=fsdp", "=", "default", "sft", "ppo"]))


def _value_for(kind):
  if kind is bool:
    return st.booleans()
  if kind is int:
    return ints
  if kind is float:
    return st.one_of(floats, ints.map(float))
  return strings


@st.composite
def mutated_config(draw):
  stage = draw(st.sampled_from(sorted(MAKERS)))
  c = MAKERS[stage]()
  for path, kind in draw(st.lists(st.sampled_from(FIELDS[stage]), min_size=1, max_size=4)):
    *parents, last = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = draw(_value_for(kind))
  return c


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_config())
def test_validate_raises_config_error_or_accepts(c):
  try:
    config_lib.validate(c)
  except ConfigError as e:
    assert str(e).startswith("config.") and "expected" in str(e)
    return
  # Accepted: the numbers a run depends on are sane (no NaN slipped through).
  for path, value in helpers.config_leaves(c):
    if isinstance(value, float) and path.split(".")[0] in ("optim", "ppo", "data"):
      assert not math.isnan(value), path


# ---------------------------------------------------------------- the launcher


def _launch(argv, timeout):
  env = helpers.launcher_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  try:
    return subprocess.run([sys.executable, os.path.join(helpers.REPO, "launch", "train.py"),
                           *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=helpers.REPO)
  except subprocess.TimeoutExpired:
    pytest.fail(f"launcher hung (> {timeout} s) on {argv}")


def _assert_clean(proc, argv):
  if proc.returncode == 0:
    return
  assert "Traceback" not in proc.stderr, (argv, proc.stderr[-4000:])
  assert "error: " in proc.stderr, (argv, proc.stderr[-2000:])


segment = st.one_of(st.sampled_from(["train", "steps", "optim", "lr", "ppo", "data", "x",
                                     "", "mesh", "0", "__class__", "items"]),
                    st.text(alphabet="abc_.-=0", min_size=1, max_size=6))
junk_value = st.one_of(st.sampled_from(["", "nan", "inf", "-1", "1e999", "[1]", "{}",
                                        "None", "True", "0x10", "'a'", "1,2", "=="]),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                      blacklist_characters="\x00"),
                               max_size=8))
junk_arg = st.one_of(
    st.builds(lambda segs, v: "--config." + ".".join(segs) + "=" + v,
              st.lists(segment, min_size=1, max_size=3), junk_value),
    st.builds(lambda segs: "--config." + ".".join(segs), st.lists(segment, min_size=1,
                                                                   max_size=2)),
    st.sampled_from(["--config", "--config=", "--workdir=", "--num_processes=x", "--helpx",
                     "--config.train", "--config.=1", "-x", "--config.train.steps"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["sft", "rm", "ppo"]), st.lists(junk_arg, min_size=1, max_size=3))
def test_launcher_malformed_command_lines(tmp_path_factory, stage, args):
  """Broken flags / unknown fields / unparsable values: one error line, fast."""
  workdir = str(tmp_path_factory.mktemp("fuzz"))
  # Only a valid-prefix field can get past parsing into training: pin the run tiny.
  argv = [f"--config=configs/{stage}.py", f"--workdir={workdir}", "--config.task=",
          "--config.data.train.path=/nonexistent/fuzz.jsonl", *args]
  proc = _launch(argv, timeout=120)
  assert proc.returncode != 0 or any(a.startswith("--help") for a in args)
  _assert_clean(proc, argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoint")
  del torch
  d = tmp_path_factory.mktemp("tiny")
  rng = random.Random(0)
  rows = [dict(prompt="say : " + " ".join(rng.choice("abcde") for _ in range(2)) + " =",
               completion=rng.choice("abcde")) for _ in range(24)]
  return dict(base=helpers.tiny_hf_llama(str(d / "base")),
              data=helpers.write_jsonl(str(d / "sft.jsonl"), rows))


# Real fields with values a user might mistype; every value is small, so a run that is
# accepted stays tiny (2 steps) and the test bounds it with a timeout.
SFT_FIELDS = ["seed", "train.batch_size", "train.grad_accum", "train.log_every",
              "train.ckpt_every", "train.eval_every", "train.keep_checkpoints",
              "train.max_consecutive_skips", "data.max_len", "data.max_prompt_len",
              "data.train.max_rows", "data.train.on_bad_row", "data.train.format",
              "data.train.split", "optim.lr", "optim.b2", "optim.schedule",
              "optim.warmup_steps", "optim.grad_clip", "model.dtype", "mesh.data", "mesh.fsdp",
              "sharding_rules", "model.preset", "tokenizer", "data.train.columns.prompt"]
SFT_VALUES = ["0", "-1", "1", "2", "3", "nan", "inf", "1e30", "abc", "", "bfloat16",
              "embed=fsdp", "error", "jsonl", "parquet", "linear", "True"]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(SFT_FIELDS), st.sampled_from(SFT_VALUES)),
                min_size=1, max_size=2))
def test_launcher_overrides_of_real_fields(tiny, tmp_path_factory, overrides):
  """Junk-ish values of real fields: a clean run or a clean error, never a JAX traceback."""
  workdir = str(tmp_path_factory.mktemp("fuzzrun"))
  argv = ["--config=configs/sft.py", f"--workdir={workdir}", "--config.task=",
          f"--config.model.init_from={tiny['base']}",
          f"--config.data.train.path={tiny['data']}", "--config.train.steps=2",
          "--config.train.batch_size=4", "--config.data.max_prompt_len=8",
          "--config.data.max_len=16", "--config.train.progress=False",
          *[f"--config.{k}={v}" for k, v in overrides]]
  proc = _launch(argv, timeout=240)
  _assert_clean(proc, argv)
