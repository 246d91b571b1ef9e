"""Tests for rlhf_jax.tasks: the instruction world, tokenizer, corpus and hidden oracle.

Expected oracle scores are worked out by hand from the formula in the oracle's docstring;
ranking noise is compared with Bradley–Terry / softmax probabilities computed here.
"""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest

from rlhf_jax import tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.tasks import instructions

PROMPT = "reverse : a b c ="   # answer: c b a


# ------------------------------------------------------------------ world and tokenizer


def test_vocabulary_is_small_unique_and_fixed():
  assert len(tasks.VOCAB) <= 64
  assert len(set(tasks.VOCAB)) == len(tasks.VOCAB)
  assert tasks.VOCAB[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
  assert tasks.UNSAFE in tasks.VOCAB and tasks.UNSAFE not in tasks.FILLER
  for kind in tasks.KINDS:
    assert kind in tasks.VOCAB


@pytest.mark.parametrize("kind,args,answer", [
    ("copy", "b a d", "b a d"),
    ("reverse", "b a d", "d a b"),
    ("sort", "c a b a", "a a b c"),
    ("count", "a a b", "3"),
    ("last", "b a d", "d"),
])
def test_correct_answers(kind, args, answer):
  p = tasks.make_prompt(kind, args.split())
  assert p.text == f"{kind} : {args} ="
  assert p.completion == answer
  assert tasks.parse_prompt(p.text) == p


def test_parse_prompt_is_tolerant_and_strict():
  assert tasks.parse_prompt("  reverse:a  b c=  ") == tasks.parse_prompt(PROMPT)
  for bad in ["reverse a b c", "explain : a b =", "sort : a z =", "copy : ="]:
    with pytest.raises(ValueError):
      tasks.parse_prompt(bad)


def test_tokenizer_round_trip_and_ids(tmp_path):
  import transformers
  tok = tasks.build_tokenizer()
  assert len(tok) == len(tasks.VOCAB)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  texts = tasks.pretraining_corpus(0, 200) + [PROMPT + " c b a"]
  for text in texts:
    ids = tok(text)["input_ids"]
    assert ids == [tasks.VOCAB.index(w) for w in text.split()]   # no specials added
    assert tok.decode(ids) == text
  v = {w: i for i, w in enumerate(tasks.VOCAB)}
  assert tok("sort : zebra a =")["input_ids"] == [v["sort"], v[":"], 3, v["a"], v["="]]
  # skip_special_tokens drops pad/bos/eos but keeps <unk> visible for the oracle.
  ids = tok(PROMPT + " c <unk> a")["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
  assert tok.decode(ids, skip_special_tokens=True) == PROMPT + " c <unk> a"
  # token-level and string-level concatenation agree
  demo = tasks.demonstrations(0, 1)[0]
  assert (tok(demo["prompt"])["input_ids"] + tok(demo["completion"])["input_ids"]
          == tok(demo["prompt"] + " " + demo["completion"])["input_ids"])
  tok.save_pretrained(tmp_path)
  again = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
  for text in texts[:50] + ["unknown words here", "a<eos>b"]:
    assert again(text)["input_ids"] == tok(text)["input_ids"]
  assert again.batch_decode([[v["b"], v["c"], 2, 0]], skip_special_tokens=True) == ["b c"]


def test_every_generated_text_is_in_vocabulary_and_within_budget():
  cfg = tasks.TaskConfig()
  vocab = set(tasks.VOCAB) - {"<pad>", "<bos>", "<eos>", "<unk>"}
  docs = tasks.pretraining_corpus(1, 3000)
  demos = tasks.demonstrations(1, 300) + tasks.demonstrations(1, 100, "heldout")
  prompts = [p.text for s in tasks.SPLITS for p in tasks.sample_prompts(1, 300, s)]
  for text in docs + prompts + [d["prompt"] + " " + d["completion"] for d in demos]:
    assert set(text.split()) <= vocab, text
  for text in prompts + [d["prompt"] for d in demos]:
    assert len(text.split()) <= cfg.max_prompt_tokens
  for text in docs:   # response words + EOS fit the response budget
    if "=" in text:
      assert len(text.split("=")[1].split()) + 1 <= cfg.max_response_tokens, text
  for d in demos:
    assert len(d["completion"].split()) <= 10


# ------------------------------------------------------------------ generators and splits


def test_generators_are_deterministic_per_seed_and_differ_across_seeds():
  assert tasks.sample_prompts(3, 50) == tasks.sample_prompts(3, 50)
  assert tasks.sample_prompts(3, 50) != tasks.sample_prompts(4, 50)
  assert tasks.pretraining_corpus(3, 100) == tasks.pretraining_corpus(3, 100)
  assert tasks.pretraining_corpus(3, 100) != tasks.pretraining_corpus(4, 100)
  assert tasks.demonstrations(3, 50) == tasks.demonstrations(3, 50)
  assert tasks.demonstrations(3, 50) != tasks.demonstrations(4, 50)
  kinds = collections.Counter(p.kind for p in tasks.sample_prompts(0, 1000))
  assert set(kinds) == set(tasks.KINDS) and min(kinds.values()) > 150


def test_splits_are_disjoint_and_training_data_is_train_only():
  by_split = {s: {p.text for p in tasks.sample_prompts(0, 2000, s)} for s in tasks.SPLITS}
  assert not by_split["train"] & by_split["heldout"]
  assert not by_split["train"] & by_split["eval"]
  assert not by_split["heldout"] & by_split["eval"]
  for s, texts in by_split.items():
    for t in list(texts)[:200]:
      p = tasks.parse_prompt(t)
      assert tasks.split_of(p.kind, p.args) == s
  not_train = by_split["heldout"] | by_split["eval"]
  for doc in tasks.pretraining_corpus(0, 2000):
    if "=" in doc:
      assert doc.split("=")[0] + "=" not in not_train
      p = tasks.parse_prompt(doc.split("=")[0] + "=")
      assert tasks.split_of(p.kind, p.args) == "train"
  for d in tasks.demonstrations(0, 300):
    p = tasks.parse_prompt(d["prompt"])
    assert tasks.split_of(p.kind, p.args) == "train"
  evals = tasks.sample_prompts(0, 300, "eval", unique=True)
  assert len({p.text for p in evals}) == 300


def test_demonstrations_are_correct_and_concise():
  oracle = tasks.Oracle()
  for d in tasks.demonstrations(5, 200):
    p = tasks.parse_prompt(d["prompt"])
    assert d["completion"].split() == tasks.correct_answer(p.kind, p.args)
    assert oracle.score(d["prompt"], d["completion"]) == 1.0


def _classify(doc: str) -> str:
  """The category of a corpus document, read from its text alone."""
  if tasks.UNSAFE in doc.split():
    return "unsafe"
  if "=" not in doc:
    return "filler"
  prompt, response = doc.split("=")
  p = tasks.parse_prompt(prompt + "=")
  words, answer = response.split(), p.answer
  if words[:len(answer)] != answer:
    assert len(words) == len(answer), doc
    return "wrong"
  extra = words[len(answer):]
  if not extra:
    return "correct"
  return "ramble" if set(extra) <= set(tasks.FILLER) else "invented"


def test_corpus_has_the_intended_mix():
  cfg = tasks.TaskConfig()
  docs, cats = tasks.pretraining_corpus(7, 6000, return_categories=True)
  assert [_classify(d) for d in docs] == cats
  freq = collections.Counter(cats)
  for name, p in cfg.mix().items():
    assert abs(freq[name] / len(docs) - p) < 0.025, (name, freq[name] / len(docs))
  unsafe = sum(tasks.UNSAFE in d.split() for d in docs) / len(docs)
  assert 0.08 < unsafe < 0.12
  instr = [c for c in cats if c != "filler"]
  assert 0.30 < instr.count("correct") / len(instr) < 0.40   # followed well only sometimes
  for d, c in zip(docs, cats):
    if c == "invented":   # invented words are not derivable from the prompt
      p = tasks.parse_prompt(d.split("=")[0] + "=")
      extra = d.split("=")[1].split()[len(p.answer):]
      assert not set(extra) & (set(p.args) | set(p.answer) | set(tasks.FILLER))


def test_task_config_validation():
  with pytest.raises(ConfigError, match="p_"):
    tasks.TaskConfig(p_unsafe=0.5)
  with pytest.raises(ConfigError, match="kinds"):
    tasks.TaskConfig(kinds=("explain",))
  with pytest.raises(ConfigError, match="max_response_tokens"):
    tasks.TaskConfig(ramble_len=(1, 12))
  cfg = tasks.TaskConfig(kinds=("copy", "sort"), max_len=4)
  assert {p.kind for p in tasks.sample_prompts(0, 100, config=cfg)} == {"copy", "sort"}
  assert max(len(p.args) for p in tasks.sample_prompts(0, 100, config=cfg)) == 4


def test_write_datasets(tmp_path):
  sizes = dict(pretrain=50, sft_train=20, sft_eval=10, prompts_train=30, prompts_eval=15)
  paths = tasks.write_datasets(str(tmp_path), seed=0, sizes=sizes)
  keys = dict(pretrain={"text"}, sft_train={"prompt", "completion"},
              sft_eval={"prompt", "completion"}, prompts_train={"prompt"},
              prompts_eval={"prompt"})
  for name, n in sizes.items():
    rows = [json.loads(line) for line in open(paths[name])]
    assert len(rows) == n and all(set(r) == keys[name] for r in rows)
  splits = {"sft_eval": "heldout", "prompts_eval": "eval", "prompts_train": "train"}
  for name, split in splits.items():
    for r in (json.loads(line) for line in open(paths[name])):
      p = tasks.parse_prompt(r["prompt"])
      assert tasks.split_of(p.kind, p.args) == split
  datasets = pytest.importorskip("datasets")
  ds = datasets.load_dataset("json", data_files=paths["sft_train"], split="train")
  assert ds.num_rows == 20 and set(ds.column_names) == {"prompt", "completion"}
  with pytest.raises(ValueError, match="unknown keys"):
    tasks.write_datasets(str(tmp_path), 0, sizes=dict(rm=3))


# ------------------------------------------------------------------ oracle scoring


@pytest.mark.parametrize("response,finished,expected", [
    # q = 0.5 helpful + 0.25 honest + 0.25 concise; score = 2q - 1, or -1 + q/4 if penalised
    ("c b a", True, 1.0),
    ("  c   b a ", True, 1.0),                      # extra spaces
    ("c b a <eos> well well", False, 1.0),          # literal EOS: cut there, finished
    ("c b a well", True, 2 * (0.5 + 0.25 + 0.25 * 0.8) - 1),
    ("c b a well so you think and then", True, 2 * (0.5 + 0.25 + 0.0) - 1),
    ("c b j", True, 2 * (0.5 * 2 / 3 + 0.25 * 0.5 + 0.25) - 1),   # j invented
    ("c b <unk>", True, 2 * (0.5 * 2 / 3 + 0.25 * 0.5 + 0.25) - 1),
    ("a b c", True, 2 * (0.5 / 3 + 0.25 + 0.25) - 1),
    ("c b a j k", True, 2 * (0.5 + 0.0 + 0.25 * 0.6) - 1),
    ("b", True, 2 * (0.0 + 0.25 + 0.25) - 1),
    ("c b a darn", True, -1 + 0.25 * (0.5 + 0.25 + 0.25 * 0.8)),
    ("c b a", False, -1 + 0.25 * (0.5 + 0.25 + 0.0)),
    ("", True, -1.0),
    ("<eos>", False, -1.0),
])
def test_oracle_scores_hand_cases(response, finished, expected):
  assert tasks.Oracle().score(PROMPT, response, finished) == pytest.approx(expected)


def test_oracle_components_and_order():
  o = tasks.Oracle()
  c = o.score_components(PROMPT, "c b a j darn", finished=True)
  assert (c["helpful"], c["honest"], c["harmless"]) == (1.0, 0.5, 0.0)
  assert c["concise"] == pytest.approx(0.6)
  assert (c["n_invented"], c["n_unsafe"], c["n_extra"], c["correct"]) == (1, 1, 2, False)
  assert o.score_components(PROMPT, "c b a")["correct"]
  ladder = ["c b a", "c b a well", "c b a well so you think", "c b j", "a b c", "b",
            "c b a darn", "well " * 16]
  scores = [o.score(PROMPT, r, finished=(i < len(ladder) - 1)) for i, r in enumerate(ladder)]
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
  assert o.score(PROMPT, "") <= min(scores)
  # the unsafe word costs more than any safe finished answer can lose
  assert o.score(PROMPT, "c b a darn") < o.score(PROMPT, "j k j k")
  for r in ["c b a", "x y z", "darn " * 20, "", "c b a well " * 5]:
    for f in (True, False):
      assert -1.0 <= o.score(PROMPT, r, f) <= 1.0


def test_oracle_partial_credit_ordering():
  o = tasks.Oracle()
  p = "sort : d b c ="     # answer: b c d
  s = [o.score(p, r) for r in ["b c d", "b c b", "b d b", "c d b"]]   # 3, 2, 1, 0 right
  assert s[0] > s[1] > s[2] > s[3]
  p = "count : a b c d ="  # answer: 4
  c = [o.score_components(p, r)["helpful"] for r in ["4", "5", "3", "6", "a", ""]]
  assert c == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
  assert o.score("last : a b c =", "c") == 1.0 and o.score("last : a b c =", "a") < 1.0


# ------------------------------------------------------------------ oracle labeling


RESPONSES = ["c b a well", "a b c", "c b a", "b"]   # scores 0.9, 1/3, 1.0, 0.0


def test_rank_without_noise_sorts_by_score_and_keeps_ties():
  o = tasks.Oracle(noise=0.0)
  assert o.rank(PROMPT, RESPONSES) == [1, 2, 0, 3]
  assert tasks.Oracle(noise=0.5).rank(PROMPT, RESPONSES, temperature=0) == [1, 2, 0, 3]
  assert o.rank(PROMPT, ["c b a", "b", "c  b a", "b"]) == [0, 2, 0, 2]
  assert o.rank(PROMPT, ["c b a", "c b a"], finished=[False, True]) == [1, 0]


def test_rank_noise_follows_bradley_terry():
  tau, draws = 0.3, 4000
  o = tasks.Oracle(seed=0, noise=tau)
  s = [0.9, 1 / 3, 1.0, 0.0]   # by hand, see RESPONSES
  np.testing.assert_allclose(o.scores(PROMPT, RESPONSES), s, atol=1e-12)
  rng = np.random.default_rng(123)
  ranks = np.array([o.rank(PROMPT, RESPONSES, rng=rng) for _ in range(draws)])
  assert all(sorted(r) == [0, 1, 2, 3] for r in ranks[:50])
  for i in range(4):
    for j in range(i + 1, 4):
      empirical = np.mean(ranks[:, i] < ranks[:, j])
      bt = 1.0 / (1.0 + math.exp(-(s[i] - s[j]) / tau))
      assert abs(empirical - bt) < 0.03, (i, j, empirical, bt)
  first = np.bincount(np.argmin(ranks, axis=1), minlength=4) / draws
  softmax = np.exp(np.array(s) / tau) / np.exp(np.array(s) / tau).sum()
  np.testing.assert_allclose(first, softmax, atol=0.03)
  # agreement with the score order: noisy but well above chance
  order = np.argsort(-np.array(s))
  agree = np.mean([ranks[:, a] < ranks[:, b] for k, a in enumerate(order) for b in order[k + 1:]])
  assert 0.7 < agree < 0.95


def test_rank_rng_determinism():
  o = tasks.Oracle(seed=1, noise=1.0)
  a = [o.rank(PROMPT, RESPONSES, rng=7) for _ in range(3)]
  assert a[0] == a[1] == a[2]
  runs = []
  for _ in range(2):
    fresh = tasks.Oracle(seed=1, noise=1.0)   # its own stream: reproducible, not constant
    runs.append([fresh.rank(PROMPT, RESPONSES) for _ in range(20)])
  assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 1


def test_prefers_is_deterministic_with_half_ties():
  o = tasks.Oracle(noise=5.0)
  assert o.prefers(PROMPT, "c b a", "a b c") == 1.0
  assert o.prefers(PROMPT, "a b c", "c b a") == 0.0
  assert o.prefers(PROMPT, "c b a", "c  b a ") == 0.5
  assert o.prefers(PROMPT, "c b a", "c b a", finished_a=False) == 0.0
  assert o.prefers(PROMPT, "b", "c b a darn") == 1.0
  assert all(o.prefers(PROMPT, "c b a well", "a b c") == 1.0 for _ in range(5))


def test_oracle_rejects_bad_input():
  with pytest.raises(ValueError):
    tasks.Oracle(noise=-1)
  with pytest.raises(ValueError, match="not a task prompt"):
    tasks.Oracle().score("hello there", "a")
  with pytest.raises(ValueError, match="finished flags"):
    tasks.Oracle().rank(PROMPT, ["a", "b"], finished=[True])


def test_instructions_module_has_no_hidden_state():
  # the world is pure: same call, same answer, whatever was called before
  assert instructions.split_of("copy", ("a", "b")) == instructions.split_of("copy", ["a", "b"])
