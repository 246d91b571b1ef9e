"""A user drives every config field from the command line, and hears about mistakes.

Through the real launcher: column renames, `--helpfull` listing every field with its
default and comment, a mistyped field answered with the closest real ones, user data
without `--config.task=`, and a built-in-task override that a stage replaces named in a
warning. Plus the user-data defaults (lengths, K from the data, bf16 on accelerators).
"""

from __future__ import annotations


import os

import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import config_help, data
from rlhf_jax.pipeline import settings

torch = pytest.importorskip("torch", reason="torch makes the tiny HF checkpoint")


def test_renamed_columns_train_from_the_command_line(tmp_path):
  base = helpers.tiny_hf_llama(str(tmp_path / "base"))
  rows = [dict(question=r["prompt"], answer=r["completion"]) for r in helpers.copy_rows(16)]
  train = helpers.write_jsonl(str(tmp_path / "qa.jsonl"), rows)
  proc = helpers.run_launcher(
      "configs/sft.py", str(tmp_path / "sft"), f"--config.model.init_from={base}",
      f"--config.data.train.path={train}", "--config.data.train.columns.prompt=question",
      "--config.data.train.columns.completion=answer", "--config.train.steps=2",
      "--config.train.batch_size=8", "--config.data.max_prompt_len=8",
      "--config.data.max_len=16")
  # No --config.task=: giving your data is enough.
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "training on your data" in proc.stderr
  assert "16 used" in proc.stderr   # every renamed row was read


def test_helpfull_lists_every_config_field_with_default_and_comment():
  proc = helpers.run_launcher("configs/ppo.py", "unused", "--helpfull")
  assert proc.returncode == 0, proc.stderr[-2000:]
  listed = [l.strip() for l in proc.stdout.splitlines() if l.strip().startswith("--config.")]
  c = config_lib.ppo_config()
  c.pipeline = settings.task_settings()
  want = {f"--config.{p}" for p, _ in config_help.leaves(c)}
  assert {l.split("=", 1)[0] for l in listed} == want
  assert "--config.ppo.kl_coef=0.02  # β" in listed
  assert any(l.startswith("--config.data.train.columns.prompt=''") for l in listed)


def test_a_mistyped_field_is_one_line_with_the_closest_names(tmp_path):
  proc = helpers.run_launcher("configs/ppo.py", str(tmp_path / "w"), "--config.ppo.kl_cof=0.1")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert len(errors) == 1 and "\\n" not in errors[0]
  assert errors[0].startswith("error: --config.ppo.kl_cof: unknown config field 'kl_cof'; "
                              "did you mean --config.ppo.kl_coef"), errors[0]


def test_overrides_the_built_in_task_replaces_are_named():
  c = config_lib.ppo_config()
  c.pipeline = settings.task_settings("tiny")
  c.train.ckpt_every = 5
  c.data.max_len = 300
  c.seed = 3
  stage_configs = {name: settings.stage_config(name, c, c.pipeline, "/w", "/w/task_data")
                   for name in ("pretrain", "sft", "rm", "ppo")}
  lines = settings.replaced_overrides(c, stage_configs,
                                      ("train.ckpt_every", "data.max_len", "seed"))
  assert [l.split("=")[0] for l in lines] == ["train.ckpt_every", "data.max_len"]
  assert "pretrain: 3" in lines[0] and "ppo: 1" in lines[0]   # half the stage's steps
  assert all(sc.seed == 3 for sc in stage_configs.values())    # inherited, not replaced


def test_user_data_defaults_fit_real_models():
  for make in (config_lib.sft_config, config_lib.rm_config, config_lib.ppo_config):
    c = make()
    assert c.data.max_prompt_len >= 256 and c.data.max_len >= 512
    assert c.model.dtype == "auto"
  assert config_lib.ppo_config().ppo.max_new_tokens >= 256
  assert config_lib.rm_config().rm.k_max == 0
  assert config_lib.compute_dtype("auto") == "float32"      # this CPU
  assert config_lib.compute_dtype("bfloat16") == "bfloat16"


def test_k_is_taken_from_the_data(tmp_path):
  tok = helpers.word_tokenizer()
  pairs = helpers.write_jsonl(str(tmp_path / "pairs.jsonl"),
                              [dict(prompt="say : a =", chosen="a", rejected="b")] * 3)
  ranked = helpers.write_jsonl(str(tmp_path / "ranked.jsonl"), [
      dict(prompt="say : a =", responses=["a", "b", "c"], ranks=[0, 1, 2]),
      dict(prompt="say : b =", responses=["b", "a", "c", "d", "e"], ranks=[0, 1, 1, 2, 3])])
  got = data.load_comparisons(data.DataSpec(path=pairs), tok, 8, 16, 0).arrays
  assert got["input_ids"].shape[1] == 2                    # pairs: K = 2, not 9 slots
  got = data.load_comparisons(data.DataSpec(path=ranked), tok, 8, 16, 0).arrays
  assert got["input_ids"].shape[1] == 5
  np.testing.assert_array_equal(got["valid"].sum(1), [3, 5])


def test_too_little_ptx_text_names_the_file_and_the_fields(tmp_path):
  base = helpers.tiny_hf_llama(str(tmp_path / "base"))
  prompts = helpers.write_jsonl(str(tmp_path / "p.jsonl"),
                                [dict(prompt=r["prompt"]) for r in helpers.copy_rows(16)])
  ptx = helpers.write_jsonl(str(tmp_path / "ptx.jsonl"), [dict(text="a b c d e")] * 64)
  fn = tmp_path / "fn.py"
  fn.write_text("def score(prompts, responses):\n  return [0.0] * len(responses)\n")
  proc = helpers.run_launcher(
      "configs/ppo.py", str(tmp_path / "ppo"), f"--config.model.init_from={base}",
      f"--config.ppo.reward_fn={fn}:score", f"--config.data.train.path={prompts}",
      f"--config.data.ptx.path={ptx}", "--config.train.batch_size=8",
      "--config.data.max_prompt_len=8", "--config.data.max_len=64",
      "--config.ppo.max_new_tokens=8")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert len(errors) == 1, proc.stderr[-2000:]
  assert f"data.ptx.path={ptx}: 64 rows packed into" in errors[0], errors[0]
  assert "ppo.minibatches=4 x ppo.ptx_batch_size=8" in errors[0], errors[0]


def test_readme_model_size_rows_give_valid_meshes():
  """Each override row of the README's "Real model sizes" table validates and builds its
  mesh on the number of devices the row names (the suite's fake CPU devices)."""
  import jax
  from rlhf_jax import sharding
  readme = open(os.path.join(helpers.REPO, "README.md")).read()
  rows = [line for line in readme.splitlines()
          if line.startswith("| ~") and "--config.mesh" in line]
  assert len(rows) == 5
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    devices, overrides = int(cells[2]), cells[3].strip("`").split()
    for make in (config_lib.sft_config, config_lib.rm_config, config_lib.ppo_config):
      c = make()
      c.task = ""
      c.data.train.path = "user/dataset"
      if "norm" in c.data:
        c.data.norm.path = "user/demos"
      for override in overrides:
        path, value = override[len("--config."):].split("=")
        *parents, leaf = path.split(".")
        node = c
        for part in parents:
          node = node[part]
        node[leaf] = type(node[leaf])(value == "True" if value in ("True", "False")
                                      else int(value))
      config_lib.validate(c)
      mesh = sharding.make_mesh(dict(c.mesh), devices=jax.devices()[:devices])
      assert mesh.size == devices, row
