"""Chat comparison rows, `finished`, a template's end-of-turn token, stop ids, and prompts
ending in whitespace.

Expected ids are built here from literal strings with the tokenizer's own
`tokenizer(text, add_special_tokens=False)`, never from the loaders' output.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import data, models, sampling
from test_data import right_padded, write

WORDS = ["hello", "world", "how", "are", "you", "fine", "good", "bad", "a", "b", "c"]
SPECIAL = ["<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# <|role|> content <|end|> per turn; the generation prompt opens the assistant turn.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
PAD, EOS, END = 0, 1, 5


def make_chat_tokenizer(template: str = TEMPLATE):
  """Word-level tokenizer: SPECIAL (ids 0-5, registered special), <unk>=6, then WORDS."""
  import tokenizers
  from tokenizers import AddedToken
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(SPECIAL + ["<unk>"] + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
  out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>")
  out.chat_template = template
  return out


@pytest.fixture(scope="module")
def tok():
  return make_chat_tokenizer()


def ids(tokenizer, text):
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def user(text):
  return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ end of turn, stop ids


def test_closing_text_and_stop_ids(tok, tmp_path):
  assert data.closing_text(tok) == " <|end|>"
  assert data.end_of_turn_ids(tok) == [END]
  assert data.stop_ids(tok) == [EOS, END]
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [END, 3]}))
  assert data.stop_ids(tok, model_dir=str(tmp_path)) == [EOS, END, 3]
  # A template that writes nothing after the reply, or no template: EOS only.
  plain = make_chat_tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}")
  assert data.closing_text(plain) == "" and data.stop_ids(plain) == [EOS]
  plain.chat_template = None
  assert data.stop_ids(plain) == [EOS]


def test_sft_trains_the_end_of_turn_token(tok, tmp_path):
  rows = [{"messages": user("hello") + [{"role": "assistant", "content": "fine good"}]},
          {"messages": [{"role": "system", "content": "a"}] + user("how are you") +
           [{"role": "assistant", "content": "bad"}]}]
  out = data.load_sft(data.DataSpec(write(tmp_path / "sft.jsonl", rows)), tok, 16, 20)
  prompts = ["<|user|> hello <|end|> <|assistant|> ",
             "<|system|> a <|end|> <|user|> how are you <|end|> <|assistant|> "]
  targets = ["fine good <|end|>", "bad <|end|>"]
  seqs = [ids(tok, p) + ids(tok, t) + [EOS] for p, t in zip(prompts, targets)]
  np.testing.assert_array_equal(out.arrays["input_ids"], right_padded(seqs, 20)[0])
  for n, p in enumerate(prompts):
    plen = len(ids(tok, p))
    want = [0] * plen + [1] * (len(seqs[n]) - plen) + [0] * (20 - len(seqs[n]))
    assert out.arrays["loss_mask"][n].tolist() == want
    # The terminator is a target, right before EOS.
    assert out.arrays["input_ids"][n, len(seqs[n]) - 2] == END
  assert out.format == "chat" and out.is_chat


def test_sft_template_that_writes_eos_gets_no_second_one(tmp_path):
  tok = make_chat_tokenizer(TEMPLATE.replace("<|end|> ", "{{ eos_token }} "))
  rows = [{"messages": user("hello") + [{"role": "assistant", "content": "fine"}]}]
  out = data.load_sft(data.DataSpec(write(tmp_path / "sft.jsonl", rows)), tok, 16, 16)
  assert data.stop_ids(tok) == [EOS]
  seq = ids(tok, "<|user|> hello </s> <|assistant|> ") + ids(tok, "fine </s>")
  assert out.arrays["input_ids"][0, :len(seq)].tolist() == seq
  assert out.arrays["attention_mask"][0].sum() == len(seq)


# ------------------------------------------------------------------ chat comparisons


def test_chat_comparisons_match_ppo_prompts(tok, tmp_path):
  conv = [{"role": "system", "content": "a"}] + user("how are you")
  rows = [{"messages": conv, "chosen": "fine",
           "rejected": {"role": "assistant", "content": "bad bad"}},
          {"messages": user("hello"), "chosen": [{"role": "assistant", "content": "good"}],
           "rejected": "bad"}]
  path = write(tmp_path / "pairs.jsonl", rows)
  out = data.load_comparisons(data.DataSpec(path), tok, 16, 20, k_max=2)
  a = out.arrays
  prompts = ["<|system|> a <|end|> <|user|> how are you <|end|> <|assistant|> ",
             "<|user|> hello <|end|> <|assistant|> "]
  responses = [["fine", "bad bad"], ["good", "bad"]]
  for n in range(2):
    for k in range(2):
      seq = ids(tok, prompts[n]) + ids(tok, responses[n][k]) + [END]
      assert a["input_ids"][n, k, :len(seq)].tolist() == seq
      assert a["attention_mask"][n, k].sum() == len(seq)
      assert a["last_index"][n, k] == len(seq) - 1  # the terminator: where PPO stops
  assert out.format == "chat"
  # Prompt ids are exactly those of the PPO prompt loader on the same conversations.
  ppo = data.load_prompts(data.DataSpec(write(tmp_path / "p.jsonl", [
      {"messages": r["messages"]} for r in rows])), tok, 16)
  for n in range(2):
    p = ppo.arrays["input_ids"][n][ppo.arrays["attention_mask"][n] == 1].tolist()
    assert a["input_ids"][n, 0, :len(p)].tolist() == p
  # Stopping on EOS alone instead: the response runs on to the EOS after the terminator.
  eos_only = data.load_comparisons(data.DataSpec(path), tok, 16, 20, k_max=2,
                                   stop_ids=[EOS])
  seq = ids(tok, prompts[1]) + ids(tok, "good") + [END, EOS]
  assert eos_only.arrays["input_ids"][1, 0, :len(seq)].tolist() == seq
  assert eos_only.arrays["last_index"][1, 0] == len(seq) - 1


def test_chat_ranked_with_finished_and_renamed_columns(tok, tmp_path):
  rows = [{"conv": user("hello"), "outs": ["good", "bad a", "c"], "order": [0, 2, 1],
           "done": [True, False, True]}]
  spec = data.DataSpec(write(tmp_path / "ranked.jsonl", rows),
                       columns=dict(messages="conv", responses="outs", ranks="order",
                                    finished="done"))
  a = data.load_comparisons(spec, tok, 16, 16, k_max=3).arrays
  p = ids(tok, "<|user|> hello <|end|> <|assistant|> ")
  want = [p + ids(tok, "good") + [END], p + ids(tok, "bad a"), p + ids(tok, "c") + [END]]
  for k, seq in enumerate(want):
    assert a["input_ids"][0, k, :len(seq)].tolist() == seq
    assert a["attention_mask"][0, k].sum() == len(seq)
    assert a["last_index"][0, k] == len(seq) - 1
  assert a["input_ids"][0, 1, len(want[1]) - 1] == ids(tok, "a")[0]  # no terminator, no EOS
  assert a["ranks"][0].tolist() == [0, 2, 1]


def test_plain_finished(tmp_path):
  from test_data import make_tokenizer
  tok = make_tokenizer()  # <eos> = 1
  rows = [dict(prompt="hello", responses=["good", "bad a"], ranks=[0, 1],
               finished=[False, True]),
          dict(prompt="how", chosen="fine", rejected="bad", finished=[True, False]),
          dict(prompt="how", chosen="fine", rejected="bad")]
  for r, row in enumerate(rows):
    path = write(tmp_path / f"rm{r}.jsonl", [row])
    a = data.load_comparisons(data.DataSpec(path), tok, 4, 8, k_max=2).arrays
    texts = row.get("responses") or [row["chosen"], row["rejected"]]
    for k, (text, fin) in enumerate(zip(texts, row.get("finished", [True, True]))):
      seq = ids(tok, row["prompt"]) + ids(tok, text) + ([1] if fin else [])
      assert a["input_ids"][0, k, :len(seq)].tolist() == seq
      assert a["attention_mask"][0, k].sum() == len(seq)
      assert a["last_index"][0, k] == len(seq) - 1


@pytest.mark.parametrize("row,reason,field", [
    ({"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1], "finished": [True, 1]},
     "wrong_type", "finished"),
    ({"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1], "finished": "yes"},
     "wrong_type", "finished"),
    ({"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1], "finished": [True]},
     "length_mismatch", "finished"),
])
def test_bad_finished_is_a_bad_row(tmp_path, row, reason, field):
  from test_data import make_tokenizer
  good = {"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1], "finished": [True, True]}
  path = write(tmp_path / "rows.jsonl", [good, row])
  out = data.load_comparisons(data.DataSpec(path), make_tokenizer(), 4, 8, k_max=2)
  assert out.report.skipped == {reason: 1} and out.report.examples == {reason: [1]}
  with pytest.raises(data.DataError, match=f"row 1.*'{field}'.*{reason}"):
    data.load_comparisons(data.DataSpec(path, on_bad_row="error"), make_tokenizer(), 4, 8,
                          k_max=2)


def test_chat_comparison_bad_rows(tok, tmp_path):
  good = {"messages": user("hello"), "chosen": "good", "rejected": "bad"}
  rows = [good,
          {"messages": user("a") + [{"role": "assistant", "content": "b"}], "chosen": "good",
           "rejected": "bad"},                                          # prompt ends with reply
          {"messages": user("a"), "chosen": {"role": "user", "content": "b"},
           "rejected": "bad"},                                          # not an assistant turn
          {"messages": user("a"), "chosen": [{"role": "assistant", "content": "b"}] * 2,
           "rejected": "bad"},                                          # two messages
          {"messages": user("a"), "chosen": "good", "rejected": 3},
          {"messages": user("a"), "chosen": "good", "rejected": {"role": "assistant",
                                                                "content": " "}}]
  out = data.load_comparisons(data.DataSpec(write(tmp_path / "c.jsonl", rows)), tok, 16, 16,
                              k_max=2)
  assert out.report.n_used == 1
  assert out.report.skipped == {"wrong_type": 4, "empty": 1}
  assert out.report.examples == {"wrong_type": [1, 2, 3, 4], "empty": [5]}


def test_format_flags(tok, tmp_path):
  from test_data import make_tokenizer
  plain = make_tokenizer()
  p = write(tmp_path / "plain.jsonl", [dict(prompt="hello", completion="world",
                                            chosen="good", rejected="bad")])
  c = write(tmp_path / "chat.jsonl", [{"messages": user("hello") + [
      {"role": "assistant", "content": "world"}], "chosen": "good", "rejected": "bad"}])
  assert data.load_sft(data.DataSpec(p), plain, 4, 8).format == "plain"
  assert not data.load_comparisons(data.DataSpec(p), plain, 4, 8, 2).is_chat
  assert data.load_prompts(data.DataSpec(p), plain, 4).format == "plain"
  assert data.load_sft(data.DataSpec(c), tok, 16, 16).format == "chat"
  assert data.load_prompts(data.DataSpec(c), tok, 16).format == "chat"


# ------------------------------------------------------------------ trailing whitespace


@pytest.fixture(scope="module")
def bpe():
  """A GPT-2-style byte-level BPE: spaces attach to the next word (" world" is one token)."""
  import tokenizers
  from tokenizers import decoders, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["Question: hello world\nAnswer: world hello good"] * 50, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


PROMPT, COMPLETION = "Question: hello\nAnswer: ", "world"


def test_bpe_prompt_ending_in_space_tokenizes_like_joint_text(bpe, tmp_path):
  joint = ids(bpe, PROMPT + COMPLETION)
  # The test means something: separate tokenization differs from the joint one here.
  assert ids(bpe, PROMPT) + ids(bpe, COMPLETION) != joint
  head = ids(bpe, PROMPT.rstrip())
  assert joint[:len(head)] == head
  eos = bpe.eos_token_id
  path = write(tmp_path / "sft.jsonl", [dict(prompt=PROMPT, completion=COMPLETION),
                                        dict(prompt="Answer:", completion=" good")])
  out = data.load_sft(data.DataSpec(path), bpe, 16, 24)
  seq = joint + [eos]
  assert out.arrays["input_ids"][0, :len(seq)].tolist() == seq
  assert out.arrays["loss_mask"][0].tolist() == [0] * len(head) + [1] * (len(seq) - len(
      head)) + [0] * (24 - len(seq))
  assert out.report.notes == {"prompt_trailing_whitespace": 1}
  assert "prompt_trailing_whitespace: 1" in str(out.report)

  rm = data.load_comparisons(data.DataSpec(write(tmp_path / "rm.jsonl", [dict(
      prompt=PROMPT, chosen=COMPLETION, rejected="good")])), bpe, 16, 24, k_max=2)
  for k, text in enumerate([COMPLETION, "good"]):
    seq = ids(bpe, PROMPT + text) + [eos]
    assert rm.arrays["input_ids"][0, k, :len(seq)].tolist() == seq
  assert rm.report.notes == {"prompt_trailing_whitespace": 1}

  pr = data.load_prompts(data.DataSpec(path), bpe, 16)
  row = pr.arrays["input_ids"][0][pr.arrays["attention_mask"][0] == 1].tolist()
  assert row == head and pr.texts[0] == PROMPT.rstrip()
  assert pr.report.notes == {"prompt_trailing_whitespace": 1}


# ------------------------------------------------------------------ sampler stop ids


def test_generate_stops_on_any_stop_id():
  cfg = models.ModelConfig(family="llama", vocab_size=40, hidden_size=32, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                           max_position_embeddings=64)
  params = models.init(cfg, jax.random.key(0), kind="causal")
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  ids_, mask = sampling.pad_prompts([[7, 8, 9], [10, 11, 12, 13]], PAD)
  ids_, mask = jnp.asarray(ids_), jnp.asarray(mask)
  n = 8
  free = np.asarray(sampling.generate(cfg, params, ids_, mask, jax.random.key(0), n,
                                      greedy=True).tokens)
  # A terminator the model emits (row 0, step 2) and an EOS it never emits.
  end = int(free[0, 2])
  eos = next(t for t in range(1, 40) if t not in free)
  for stops in ([eos, end], (eos, end), {end, eos}, np.asarray([eos, end])):
    out = sampling.generate(cfg, params, ids_, mask, jax.random.key(0), n, greedy=True,
                            eos_id=stops, pad_id=PAD)
    tok, m = np.asarray(out.tokens), np.asarray(out.mask)
    for r in range(2):
      hits = np.flatnonzero(free[r] == end)
      stop = hits[0] if hits.size else n - 1
      assert tok[r, :stop + 1].tolist() == free[r, :stop + 1].tolist()
      assert m[r, :stop + 1].tolist() == [1] * (stop + 1)  # the terminator is kept
      assert m[r, stop + 1:].sum() == 0 and (tok[r, stop + 1:] == PAD).all()
    assert m[0].sum() <= 3
  # EOS alone does not stop at the terminator.
  only_eos = sampling.generate(cfg, params, ids_, mask, jax.random.key(0), n, greedy=True,
                               eos_id=eos, pad_id=PAD)
  assert np.asarray(only_eos.mask).sum() == 2 * n
