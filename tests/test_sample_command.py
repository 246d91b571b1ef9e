"""launch/sample.py: K samples per prompt, in the layout the reward-model stage reads.

Sampling feeds labeling: the command's rows, once a labeler adds "ranks", train the RM
stage unchanged (plain prompts here; chat rows through `data.load_comparisons`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import command_helpers
import helpers

torch = pytest.importorskip("torch", reason="the tiny HF models are built with transformers")

K = 3


def test_sampled_rows_with_ranks_train_the_rm_stage(tmp_path):
  model = helpers.tiny_hf_llama(str(tmp_path / "policy"))
  prompts = command_helpers.prompt_rows(16)
  prompts_path = helpers.write_jsonl(str(tmp_path / "prompts.jsonl"), prompts)
  out = str(tmp_path / "out" / "samples.jsonl")
  proc = command_helpers.run_command(
      "sample.py", f"--model={model}", f"--prompts={prompts_path}", f"--out={out}",
      f"--num_samples={K}", "--max_new_tokens=6", "--temperature=1.0", "--seed=3",
      "--batch_size=5", "--max_prompt_len=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = command_helpers.read_jsonl(out)
  assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
  for row in rows:
    assert set(row) == {"prompt", "responses", "finished"}
    assert len(row["responses"]) == K and all(isinstance(r, str) for r in row["responses"])
    assert len(row["finished"]) == K and all(isinstance(f, bool) for f in row["finished"])
  finished = np.array([f for r in rows for f in r["finished"]])
  assert finished.any() and not finished.all()   # 6 new tokens: some stop, some are cut
  assert not os.path.exists(out + ".tmp")
  # A labeler ranks each row's responses (any order will do); nothing else changes.
  ranked = str(tmp_path / "ranked.jsonl")
  helpers.write_jsonl(ranked, [dict(r, ranks=list(range(K))[::(-1) ** i])
                               for i, r in enumerate(rows)])
  proc = helpers.run_launcher(
      "configs/rm.py", str(tmp_path / "rm"), "--config.task=",
      f"--config.model.init_from={model}", f"--config.data.train.path={ranked}",
      "--config.rm.normalize=none", "--config.train.steps=2", "--config.train.batch_size=4",
      "--config.data.max_prompt_len=8", "--config.data.max_len=16", f"--config.rm.k_max={K}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isfile(os.path.join(tmp_path, "rm", "export", "reward_model", "config.json"))
  assert len(helpers.read_metrics(str(tmp_path / "rm"))) >= 1


def test_chat_prompts_become_messages_rows_the_comparison_loader_reads(tmp_path):
  """A chat prompt is written back as its messages (without a trailing assistant turn), so
  `data.load_comparisons` renders it with the template exactly as the sampler saw it."""
  from rlhf_jax import data, generation, sample_responses
  tok = helpers.word_tokenizer()
  tok.chat_template = ("{% for m in messages %}say {{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}={% endif %}")
  rows = [dict(messages=[dict(role="user", content="a b")]),
          dict(messages=[dict(role="user", content="c"), dict(role="assistant", content="d"),
                         dict(role="user", content="e")]),
          dict(messages=[dict(role="user", content="b"), dict(role="assistant", content="a")])]
  path = helpers.write_jsonl(str(tmp_path / "chat.jsonl"), rows)
  prompts = sample_responses.load_prompts(path, tok, max_prompt_len=16)
  assert prompts.is_chat and prompts.fields[2] == {"messages": rows[2]["messages"][:1]}
  assert prompts.texts[0] == "say a b =" and prompts.ids.shape[1] == 7  # the longest prompt
  responses = generation.Responses(
      texts=["a", "b c", "d", "e", "a a", "b"], tokens=np.zeros((6, 1), np.int32),
      mask=np.ones((6, 1), np.int32), has_eos=np.array([1, 0, 1, 1, 0, 1], bool))
  out = sample_responses.comparison_rows(prompts, responses, k=2)
  assert [set(r) for r in out] == [{"messages", "responses", "finished"}] * 3
  assert out[2]["responses"] == ["a a", "b"] and out[2]["finished"] == [False, True]
  ranked = helpers.write_jsonl(str(tmp_path / "ranked.jsonl"),
                               [dict(r, ranks=[0, 1]) for r in out])
  loaded = data.load_comparisons(data.DataSpec(path=ranked, on_bad_row="error"), tok, 16, 24,
                                 k_max=2)
  assert loaded.is_chat and len(loaded) == 3
  # Row 0, response 0: the rendered prompt, the response and EOS (finished).
  expect = tok("say a b = a", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  got = loaded.arrays["input_ids"][0, 0][loaded.arrays["attention_mask"][0, 0] > 0]
  assert list(got) == expect


def test_mesh_flag_parsing():
  from rlhf_jax import sample_responses
  from rlhf_jax.errors import UserError
  assert sample_responses.parse_mesh("data=2, fsdp=4") == dict(data=2, fsdp=4)
  assert sample_responses.parse_mesh("") == dict(data=-1)
  for bad in ("data", "data=x", "=2"):
    with pytest.raises(UserError, match="--mesh="):
      sample_responses.parse_mesh(bad)
  with pytest.raises(UserError, match="--mesh=data=3"):
    sample_responses.make_mesh("data=3")          # 8 test devices


def test_each_row_holds_samples_of_its_own_prompt(tmp_path):
  """Nearly greedy (temperature 1e-4), a prompt's K samples are one reply, the one it gets
  alone; sharded over the suite's 8 CPU devices, with a last batch that is padded."""
  from rlhf_jax import sample_responses
  model_dir = helpers.tiny_hf_llama(str(tmp_path / "policy"), seed=4)
  path = helpers.write_jsonl(str(tmp_path / "p.jsonl"), command_helpers.prompt_rows(5, seed=7))
  mesh = sample_responses.make_mesh("data=-1")
  model = sample_responses.load_model(model_dir, "causal", mesh, "--model", "float32")
  prompts = sample_responses.load_prompts(path, model.tokenizer, 8)
  cold = dict(max_new_tokens=5, temperature=1e-4, batch_size=2)
  rows = sample_responses.sample_rows(
      model, prompts, sample_responses.Settings(num_samples=K, **cold), mesh)
  alone = sample_responses.sample_rows(
      model, prompts, sample_responses.Settings(num_samples=1, **cold), mesh)
  assert [r["responses"] for r in rows] == [r["responses"] * K for r in alone]
  assert [r["finished"] for r in rows] == [r["finished"] * K for r in alone]
  assert len({r["responses"][0] for r in alone}) > 1   # the prompts do get different replies
