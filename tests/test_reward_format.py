"""The reward model sees exactly what PPO scores: same token ids, same score index.

For one conversation, in chat form (rendered by the tokenizer's chat template, closed by
its end-of-turn token) and in plain form, the ids and index the RM trains on
(`rm.load_data`), the ones its normalisation scores (`rm.score_index` on `data.norm`
demonstrations) and the ones PPO's experience scores after a rollout that sampled that
response (`ppo_experience`, index `prompt_len - 1 + length`) must be identical; and the
exported RM must give the same score in transformers (pad = EOS tokenizer). A truncated
response (`finished: false`) must be read at its last token in both.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import data, models
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import ppo_experience, rm
from test_chat_format import EOS, END, PAD, make_chat_tokenizer
from test_data import write

CFG = models.get_preset("tiny").replace(vocab_size=32, num_layers=1, eos_token_id=EOS,
                                        pad_token_id=PAD)
PROMPT, GOOD, CUT = "how are you", "fine good", "hello world a"


def _rm_config(tmp_path, rows):
  c = config_lib.rm_config()
  c.task = ""
  c.data.max_prompt_len, c.data.max_len = 12, 24
  c.rm.k_max = 2
  c.data.train.path = write(tmp_path / "cmp.jsonl", rows)
  return c


def _spec(path):
  return data.DataSpec(path=path)


def _row(chat, finished=(True, True)):
  prompt = {"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT}
  return dict(prompt, responses=[GOOD, CUT], ranks=[0, 1], finished=list(finished))


def _ppo_scored_ids(tok, chat, tmp_path, response_ids, length):
  """The sequence PPO's experience scores for a rollout that sampled `response_ids`, and
  the index it reads (via the jitted experience's own `raw_score`)."""
  prompt_row = {"messages": [{"role": "user", "content": PROMPT}]} if chat else \
      {"prompt": PROMPT}
  prompts = data.load_prompts(_spec(write(tmp_path / "p.jsonl", [prompt_row])), tok, 12)
  pids, pmask = prompts.arrays["input_ids"], prompts.arrays["attention_mask"]
  n = 12
  tokens = np.full((1, n), PAD, np.int32)
  tokens[0, :len(response_ids)] = response_ids
  rmask = (np.arange(n)[None] < length).astype(np.int32)
  p_len = pids.shape[1]
  seq = np.concatenate([pids[0][pmask[0] > 0], tokens[0, :length]])
  ppo_cfg = config_lib.ppo_config().ppo
  params = jax.device_get(models.init(CFG, jax.random.PRNGKey(0), kind="causal"))
  reward = jax.device_get(models.init(CFG, jax.random.PRNGKey(1), kind="scalar"))
  fn = jax.jit(ppo_experience.make_experience_fn(
      CFG, CFG, CFG, ppo_cfg, dict(workdir_lib.NO_NORMALIZATION), data.stop_ids(tok), p_len))
  _, m = fn(params, params, reward, reward, 0.0, pids, pmask, tokens, rmask)
  return seq, float(m["raw_score"]), reward, float(m["no_eos_frac"])


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_rm_training_normalisation_and_ppo_read_the_same_ids_and_index(tmp_path, chat):
  tok = make_chat_tokenizer() if chat else make_chat_tokenizer(None)
  stops = data.stop_ids(tok)
  assert stops == ([EOS, END] if chat else [EOS])
  # 1. What the RM trains on.
  c = _rm_config(tmp_path, [_row(chat)])
  arrays = rm.load_data(c, tok, c.data.train).arrays
  k = 0
  last = int(arrays["last_index"][0, k])
  rm_seq = arrays["input_ids"][0, k, :last + 1]
  assert rm_seq[-1] == (END if chat else EOS)
  # 2. What the normalisation scores: the same conversation as a demonstration.
  demo = {"messages": [{"role": "user", "content": PROMPT},
                       {"role": "assistant", "content": GOOD}]} if chat else \
      {"prompt": PROMPT, "completion": GOOD}
  demos = data.load_sft(_spec(write(tmp_path / "demos.jsonl", [demo])), tok, 12, 24)
  assert demos.format == ("chat" if chat else "plain")
  index = int(rm.score_index(demos.arrays, stops)[0])
  np.testing.assert_array_equal(demos.arrays["input_ids"][0, :index + 1], rm_seq)
  # 3. What PPO scores after sampling that response (it stops at the first stop id).
  prompt_ids = data.load_prompts(_spec(write(tmp_path / "p0.jsonl", [
      {"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT}])),
      tok, 12)
  n_prompt = int(prompt_ids.arrays["attention_mask"].sum())
  response = rm_seq[n_prompt:]
  seq, raw, reward, no_eos = _ppo_scored_ids(tok, chat, tmp_path, response, len(response))
  np.testing.assert_array_equal(seq, rm_seq)
  assert no_eos == 0.0
  want = float(models.scores(CFG, reward, rm_seq[None], np.ones((1, len(rm_seq)), np.int32),
                             np.array([len(rm_seq) - 1], np.int32))[0])
  np.testing.assert_allclose(raw, want, rtol=1e-5)
  # 4. The exported RM in transformers, on a pad = EOS tokenizer, reads the same token.
  torch = pytest.importorskip("torch")
  import transformers
  out = workdir_lib.export(str(tmp_path / "rm"), CFG, reward, tok, "scalar")
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  pad = hf.config.pad_token_id
  assert pad != EOS
  padded = np.full((1, 24), pad, np.int64)
  padded[0, :len(rm_seq)] = rm_seq
  with torch.no_grad():
    got = float(hf(input_ids=torch.tensor(padded),
                   attention_mask=torch.tensor((padded != pad).astype(np.int64))).logits[0, 0])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_a_truncated_response_is_read_at_its_last_token_by_both(tmp_path, chat):
  tok = make_chat_tokenizer() if chat else make_chat_tokenizer(None)
  c = _rm_config(tmp_path, [_row(chat, finished=(True, False))])
  arrays = rm.load_data(c, tok, c.data.train).arrays
  last = int(arrays["last_index"][0, 1])
  rm_seq = arrays["input_ids"][0, 1, :last + 1]
  assert rm_seq[-1] not in (EOS, END)            # no stop id appended to a cut response
  n_prompt = len(rm_seq) - len(CUT.split())
  response = rm_seq[n_prompt:]
  seq, raw, reward, no_eos = _ppo_scored_ids(tok, chat, tmp_path, response, len(response))
  np.testing.assert_array_equal(seq, rm_seq)
  assert no_eos == 1.0                            # PPO penalises it, at the same index
  want = float(models.scores(CFG, reward, rm_seq[None], np.ones((1, len(rm_seq)), np.int32),
                             np.array([len(rm_seq) - 1], np.int32))[0])
  np.testing.assert_allclose(raw, want, rtol=1e-5)


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
  """A tiny random causal model saved with the chat tokenizer (a local HF directory)."""
  out = str(tmp_path_factory.mktemp("chat_base") / "model")
  params = jax.device_get(models.init(CFG, jax.random.PRNGKey(0), kind="causal"))
  workdir_lib.export(out, CFG, params, make_chat_tokenizer(), "causal")
  return out + "/export/policy"


def _chat_rm_command(base, tmp_path, train, norm):
  import helpers
  return helpers.run_launcher(
      "configs/rm.py", str(tmp_path / "rm"), "--config.task=",
      f"--config.model.init_from={base}", f"--config.data.train.path={train}",
      f"--config.data.norm.path={norm}", "--config.train.steps=2",
      "--config.train.batch_size=4", "--config.data.max_prompt_len=12",
      "--config.data.max_len=24", "--config.rm.k_max=3", "--config.data.bucket_min_len=0")


def test_chat_k_way_rankings_train_the_rm_from_the_launcher(chat_base, tmp_path):
  rows = [{"messages": [{"role": "user", "content": "how are you"}],
           "responses": ["fine good", {"role": "assistant", "content": "bad"}, "hello"],
           "ranks": [0, 2, 1]}] * 8
  demos = [{"messages": [{"role": "user", "content": "how are you"},
                         {"role": "assistant", "content": "fine good"}]}] * 4
  proc = _chat_rm_command(chat_base, tmp_path, write(tmp_path / "cmp.jsonl", rows),
                          write(tmp_path / "demos.jsonl", demos))
  assert proc.returncode == 0, proc.stderr[-3000:]
  norm = workdir_lib.read_rm_normalization(str(tmp_path / "rm/export/reward_model"))
  assert norm["format"] == "chat" and norm["n"] == 4


def test_chat_demonstrations_with_plain_rm_rows_stop_naming_both_files(chat_base, tmp_path):
  rows = [{"prompt": "how are you", "chosen": "fine good", "rejected": "bad"}] * 8
  demos = [{"messages": [{"role": "user", "content": "how are you"},
                         {"role": "assistant", "content": "fine good"}]}] * 4
  train = write(tmp_path / "plain_pairs.jsonl", rows)
  norm = write(tmp_path / "chat_demos.jsonl", demos)
  proc = _chat_rm_command(chat_base, tmp_path, train, norm)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and train in errors[0] and norm in errors[0], proc.stderr[-2000:]
