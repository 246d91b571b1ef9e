"""Tests for rlhf_jax.data: every format from local files, bad rows, batch iteration.

Expected token arrays are built here from the strings with the tokenizer's own
`tokenizer(text, add_special_tokens=False)` and plain list arithmetic, never from the
loaders' output.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from rlhf_jax import data

WORDS = ["hello", "world", "how", "are", "you", "fine", "thanks", "good", "bad", "a", "b",
         "c", "d", "e", "user", "assistant", "system", ":", "the", "cat", "sat"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def make_tokenizer(chat: bool = False, bos_processor: bool = False, vocab_extra=0):
  """Word-level fast tokenizer: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then WORDS."""
  import tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS + [f"x{i}" for i in range(vocab_extra)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  if bos_processor:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)])
  out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                bos_token="<bos>", unk_token="<unk>")
  if chat:
    out.chat_template = CHAT_TEMPLATE
  return out


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
  return make_tokenizer(chat=True)


def ids(tokenizer, text):
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def write(path, rows, fmt=None):
  """Writes rows as .jsonl / .json (a list) / .csv / .parquet by the path's suffix."""
  path = str(path)
  fmt = fmt or os.path.splitext(path)[1][1:]
  if fmt == "jsonl":
    with open(path, "w") as f:
      for r in rows:
        f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  elif fmt == "json":
    with open(path, "w") as f:
      json.dump(rows, f)
  elif fmt == "csv":
    import csv
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def right_padded(seqs, length, pad=0):
  out = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for n, s in enumerate(seqs):
    out[n, :len(s)] = s
    mask[n, :len(s)] = 1
  return out, mask


SFT_ROWS = [dict(prompt="hello world", completion="fine thanks"),
            dict(prompt="how are you", completion="good"),
            dict(prompt="the cat", completion="sat a b c")]


# ---------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv"])
def test_sft_prompt_completion(tmp_path, tok, suffix):
  path = write(tmp_path / f"sft.{suffix}", SFT_ROWS)
  out = data.load_sft(data.DataSpec(path), tok, max_prompt_len=4, max_len=8)
  seqs = [ids(tok, r["prompt"]) + ids(tok, r["completion"]) + [1] for r in SFT_ROWS]
  want_ids, want_mask = right_padded(seqs, 8)
  loss = want_mask.copy()
  for n, r in enumerate(SFT_ROWS):
    loss[n, :len(ids(tok, r["prompt"]))] = 0
  np.testing.assert_array_equal(out.arrays["input_ids"], want_ids)
  np.testing.assert_array_equal(out.arrays["attention_mask"], want_mask)
  np.testing.assert_array_equal(out.arrays["loss_mask"], loss)
  assert all(a.dtype == np.int32 for a in out.arrays.values())
  assert (out.report.n_rows, out.report.n_used, out.report.skipped) == (3, 3, {})
  assert "3 rows read, 3 used" in str(out.report)
  np.testing.assert_array_equal(out.row_ids, [0, 1, 2])


def test_sft_renamed_columns_max_rows_and_bos(tmp_path):
  rows = [dict(q="hello", a="world"), dict(q="a", a="b"), dict(q="c", a="d")]
  path = write(tmp_path / "sft.jsonl", rows)
  spec = data.DataSpec(path, columns=dict(prompt="q", completion="a"), max_rows=2)
  bos_tok = make_tokenizer(bos_processor=True)  # tokenizer(text) puts <bos> first
  for add_bos, tokenizer, first in [(None, bos_tok, 2), (False, bos_tok, None),
                                    (True, make_tokenizer(), 2), (None, make_tokenizer(), None)]:
    out = data.load_sft(spec, tokenizer, 3, 6, add_bos=add_bos)
    pre = [first] if first is not None else []
    seqs = [pre + ids(tokenizer, r["q"]) + ids(tokenizer, r["a"]) + [1] for r in rows[:2]]
    np.testing.assert_array_equal(out.arrays["input_ids"], right_padded(seqs, 6)[0])
    np.testing.assert_array_equal(out.arrays["loss_mask"][:, :len(pre) + 1], 0)
    assert out.report.n_rows == 2


def test_sft_chat_messages(tmp_path, chat_tok):
  rows = [{"messages": [{"role": "system", "content": "good"},
                        {"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "world"}]},
          {"messages": [{"role": "user", "content": "how are you"},
                        {"role": "assistant", "content": "fine"}]}]
  path = write(tmp_path / "chat.jsonl", rows)
  out = data.load_sft(data.DataSpec(path), chat_tok, 16, 16)
  prompts = ["system : good user : hello assistant : ", "user : how are you assistant : "]
  seqs = [ids(chat_tok, p) + ids(chat_tok, c) + [1] for p, c in zip(prompts, ["world", "fine"])]
  np.testing.assert_array_equal(out.arrays["input_ids"], right_padded(seqs, 16)[0])
  for n, p in enumerate(prompts):
    assert out.arrays["loss_mask"][n].tolist() == (
        [0] * len(ids(chat_tok, p)) + [1] * (len(seqs[n]) - len(ids(chat_tok, p))) +
        [0] * (16 - len(seqs[n])))


def test_messages_without_chat_template_is_an_error(tmp_path, tok):
  path = write(tmp_path / "chat.jsonl",
               [{"conv": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                           "content": "b"}]}])
  with pytest.raises(data.DataError, match=r"chat\.jsonl.*'conv'.*chat_template"):
    data.load_sft(data.DataSpec(path, columns=dict(messages="conv")), tok, 8, 8)


# ---------------------------------------------------------------------------- comparisons


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_comparisons_pairwise(tmp_path, tok, suffix):
  rows = [dict(prompt="hello", chosen="good", rejected="bad a b"),
          dict(prompt="how are you", chosen="fine thanks", rejected="bad")]
  path = write(tmp_path / f"pairs.{suffix}", rows)
  out = data.load_comparisons(data.DataSpec(path), tok, 4, 8, k_max=3)
  a = out.arrays
  assert a["input_ids"].shape == (2, 3, 8) and a["ranks"].dtype == np.int32
  for n, r in enumerate(rows):
    for k, key in enumerate(["chosen", "rejected"]):
      seq = ids(tok, r["prompt"]) + ids(tok, r[key]) + [1]
      np.testing.assert_array_equal(a["input_ids"][n, k], right_padded([seq], 8)[0][0])
      assert a["attention_mask"][n, k].sum() == len(seq)
      assert a["last_index"][n, k] == len(seq) - 1 and a["input_ids"][n, k, len(seq) - 1] == 1
    assert a["valid"][n].tolist() == [True, True, False]
    assert a["ranks"][n, :2].tolist() == [0, 1]
    assert a["attention_mask"][n, 2].sum() == 0 and (a["input_ids"][n, 2] == 0).all()


def test_comparisons_ranked_ragged_with_ties(tmp_path, tok):
  rows = [dict(prompt="hello", responses=["a", "b b", "c"], ranks=[3, 1, 3]),
          dict(prompt="the cat", responses=["sat", "good"], ranks=[2, 1]),
          dict(prompt="how", responses=["a", "b", "c", "d"], ranks=[0, 1, 2, 3])]
  path = write(tmp_path / "ranked.json", rows)
  out = data.load_comparisons(data.DataSpec(path), tok, 4, 6, k_max=4)
  a = out.arrays
  assert a["valid"].tolist() == [[True] * 3 + [False], [True, True, False, False], [True] * 4]
  assert a["ranks"][0, :3].tolist() == [1, 0, 1]
  assert a["ranks"][1, :2].tolist() == [1, 0]
  assert a["ranks"][2].tolist() == [0, 1, 2, 3]
  for n, r in enumerate(rows):
    for k, resp in enumerate(r["responses"]):
      seq = ids(tok, r["prompt"]) + ids(tok, resp) + [1]
      assert a["input_ids"][n, k, :len(seq)].tolist() == seq
      assert a["last_index"][n, k] == len(seq) - 1


# ---------------------------------------------------------------------------- prompts / text


def test_prompts_left_padded(tmp_path, tok, chat_tok):
  rows = [dict(prompt="hello world"), dict(prompt="a"), dict(prompt="how are you")]
  out = data.load_prompts(data.DataSpec(write(tmp_path / "p.jsonl", rows)), tok, 5)
  for n, r in enumerate(rows):
    p = ids(tok, r["prompt"])
    assert out.arrays["input_ids"][n].tolist() == [0] * (5 - len(p)) + p
    assert out.arrays["attention_mask"][n].tolist() == [0] * (5 - len(p)) + [1] * len(p)
  assert out.texts == [r["prompt"] for r in rows]
  chats = [{"messages": [{"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "dropped"}]}]
  out = data.load_prompts(data.DataSpec(write(tmp_path / "c.jsonl", chats)), chat_tok, 8)
  p = ids(chat_tok, "user : hello assistant : ")
  assert out.arrays["input_ids"][0].tolist() == [0] * (8 - len(p)) + p
  assert out.texts == ["user : hello assistant : "]


def test_text_packing(tmp_path, tok):
  docs = ["hello world how are", "a", "b c d e the cat sat", "good"]
  path = write(tmp_path / "text.jsonl", [dict(text=d) for d in docs])
  out = data.load_text(data.DataSpec(path), tok, seq_len=4, pack=True)
  flat = [t for d in docs for t in ids(tok, d) + [1]]
  n = -(-len(flat) // 4)
  assert out.arrays["input_ids"].shape == (n, 4)
  got = out.arrays["input_ids"].reshape(-1)
  mask = out.arrays["attention_mask"].reshape(-1)
  assert got[mask == 1].tolist() == flat  # order kept, eos between docs, nothing lost
  assert mask.tolist() == [1] * len(flat) + [0] * (n * 4 - len(flat))
  assert (got[mask == 0] == 0).all()
  np.testing.assert_array_equal(out.arrays["loss_mask"], out.arrays["attention_mask"])
  assert out.report.n_used == 4
  unpacked = data.load_text(data.DataSpec(path), tok, seq_len=4, pack=False)
  assert unpacked.report.skipped == {"too_long": 2} and unpacked.report.examples == {
      "too_long": [0, 2]}
  assert unpacked.arrays["input_ids"].tolist() == [ids(tok, "a") + [1, 0, 0],
                                                   ids(tok, "good") + [1, 0, 0]]


# ---------------------------------------------------------------------------- bad rows

LONG = " ".join(["a"] * 20)
BAD_CASES = [  # loader, bad row, reason, field named in the error
    ("sft", {"completion": "a"}, "missing_field", "prompt"),
    ("sft", {"prompt": None, "completion": "a"}, "missing_field", "prompt"),
    ("sft", {"prompt": 3, "completion": "a"}, "wrong_type", "prompt"),
    ("sft", {"prompt": "a", "completion": ["b"]}, "wrong_type", "completion"),
    ("sft", {"prompt": "a", "completion": "  "}, "empty", "completion"),
    ("sft", {"prompt": LONG, "completion": "a"}, "prompt_too_long", "prompt"),
    ("sft", {"prompt": "a", "completion": LONG}, "too_long", "completion"),
    ("sft", [1, 2], "not_an_object", "<row>"),
    ("sft", "{not json", "malformed_json", "<row>"),
    ("sft", {"prompt": "a\ud800", "completion": "b"}, "wrong_type", "prompt"),
    ("rm", {"prompt": "a", "chosen": "b"}, "missing_field", "rejected"),
    ("rm", {"prompt": "a", "responses": ["b", "c"], "ranks": [0, "1"]}, "wrong_type", "ranks"),
    ("rm", {"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1.0]}, "wrong_type", "ranks"),
    ("rm", {"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1, 2]}, "length_mismatch",
     "ranks"),
    ("rm", {"prompt": "a", "responses": ["b"], "ranks": [0]}, "too_few_responses",
     "responses"),
    ("rm", {"prompt": "a", "responses": list("abcd"), "ranks": [0, 1, 2, 3]},
     "too_many_responses", "responses"),
    ("rm", {"prompt": "a", "responses": ["b", "c"], "ranks": [1, 1]}, "all_tied", "ranks"),
    ("rm", {"prompt": "a", "responses": ["b", ""], "ranks": [0, 1]}, "empty", "responses[1]"),
    ("rm", {"prompt": "a", "responses": ["b", LONG], "ranks": [0, 1]}, "too_long",
     "responses"),
    ("rm", {"prompt": LONG, "responses": ["b", "c"], "ranks": [0, 1]}, "prompt_too_long",
     "prompt"),
    ("prompts", {"prompt": ""}, "empty", "prompt"),
    ("prompts", {"prompt": LONG}, "prompt_too_long", "prompt"),
    ("text", {"text": {"nested": 1}}, "wrong_type", "text"),
]
GOOD = {"sft": {"prompt": "a", "completion": "b"}, "prompts": {"prompt": "a"},
        "text": {"text": "a b"}, "rm": {"prompt": "a", "responses": ["b", "c"], "ranks": [0, 1]}}


def load(kind, spec, tokenizer):
  if kind == "sft":
    return data.load_sft(spec, tokenizer, 4, 8)
  if kind == "rm":
    return data.load_comparisons(spec, tokenizer, 4, 8, k_max=3)
  if kind == "prompts":
    return data.load_prompts(spec, tokenizer, 4)
  return data.load_text(spec, tokenizer, 4, pack=False)


@pytest.mark.parametrize("kind,row,reason,field", BAD_CASES)
def test_bad_row_skip_and_error(tmp_path, tok, kind, row, reason, field):
  good = GOOD[kind]
  if kind == "rm" and "chosen" in row:
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
  path = write(tmp_path / "rows.jsonl", [good, row, good])
  out = load(kind, data.DataSpec(path), tok)
  assert out.report.skipped == {reason: 1}
  assert out.report.examples == {reason: [1]}
  assert (out.report.n_rows, out.report.n_used) == (3, 2)
  assert reason in str(out.report) and "row 1" in str(out.report)
  with pytest.raises(data.DataError) as e:
    load(kind, data.DataSpec(path, on_bad_row="error"), tok)
  msg = str(e.value)
  assert "rows.jsonl" in msg and "row 1 (line 2)" in msg and repr(field) in msg
  assert reason in msg and "expected" in msg


def test_chat_bad_rows(tmp_path, chat_tok):
  rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                          "content": "b"}]},
          {"messages": [{"role": "user", "content": "a"}]},            # no assistant turn
          {"messages": "a"},                                            # not a list
          {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
          {"messages": []}]
  out = data.load_sft(data.DataSpec(write(tmp_path / "c.jsonl", rows)), chat_tok, 8, 8)
  assert out.report.n_used == 1
  assert out.report.skipped == {"wrong_type": 3, "empty": 1}
  assert out.report.examples == {"wrong_type": [1, 2, 3], "empty": [4]}


def test_no_usable_row_names_file_and_field(tmp_path, tok):
  path = write(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b", "completion": 1}])
  with pytest.raises(data.DataError, match=r"bad\.jsonl.*'completion'"):
    data.load_sft(data.DataSpec(path), tok, 4, 8)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(data.DataError, match=r"empty\.jsonl.*no rows.*'text'"):
    data.load_text(data.DataSpec(str(empty)), tok, 8)
  assert issubclass(data.DataError, ValueError)


# ---------------------------------------------------------------------------- sources


def test_sources_errors_and_directories(tmp_path, tok, monkeypatch):
  with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
    data.load_prompts(data.DataSpec(str(tmp_path / "nope.jsonl")), tok, 4)
  (tmp_path / "broken.json").write_text("[{\"prompt\": ")
  with pytest.raises(data.DataError, match="broken.json: not valid JSON"):
    data.load_prompts(data.DataSpec(str(tmp_path / "broken.json")), tok, 4)
  (tmp_path / "junk.parquet").write_text("not parquet")
  with pytest.raises(data.DataError, match="junk.parquet: cannot read"):
    data.load_prompts(data.DataSpec(str(tmp_path / "junk.parquet")), tok, 4)
  with pytest.raises(data.DataError, match="on_bad_row"):
    data.DataSpec("x.jsonl", on_bad_row="ignore")
  with pytest.raises(data.DataError, match="unknown role 'answer'"):
    data.DataSpec("x.jsonl", columns=dict(answer="a"))
  d = tmp_path / "ds"
  d.mkdir()
  write(d / "train-0.jsonl", [dict(prompt="a")])
  write(d / "train-1.parquet", [dict(prompt="b")])
  write(d / "test.jsonl", [dict(prompt="c")])
  out = data.load_prompts(data.DataSpec(str(d)), tok, 4)
  assert out.texts == ["a", "b"]
  assert data.load_prompts(data.DataSpec(str(d), split="test"), tok, 4).texts == ["c"]
  odd = tmp_path / "odd.jsonl"  # a BOM, CRLF, a raw U+2028 inside a string, a blank line
  odd.write_text("\ufeff" + json.dumps(dict(prompt="a\u2028b"), ensure_ascii=False) +
                 "\r\n\n" + json.dumps(dict(prompt="c")) + "\n", encoding="utf-8")
  out = data.load_prompts(data.DataSpec(str(odd)), tok, 4)
  assert out.texts == ["a\u2028b", "c"] and out.report.n_rows == 2
  (tmp_path / "nodata").mkdir()
  with pytest.raises(data.DataError, match="nodata: directory holds no"):
    data.load_prompts(data.DataSpec(str(tmp_path / "nodata")), tok, 4)
  bad = write(d / "train-2.jsonl", [dict(prompt="a"), dict(prompt=1)])
  with pytest.raises(data.DataError, match=r"row 3 \(train-2.jsonl line 2\)"):
    data.load_prompts(data.DataSpec(str(d), on_bad_row="error"), tok, 4)
  os.remove(bad)


def test_hub_and_saved_datasets(tmp_path, tok, monkeypatch):
  import datasets
  ds = datasets.Dataset.from_list([dict(prompt="hello"), dict(prompt="a b")])
  calls = []

  def fake_load_dataset(name, split=None, **kw):
    calls.append((name, split))
    if name == "org/missing":
      raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
    return ds
  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  out = data.load_prompts(data.DataSpec("org/prompts", split="validation"), tok, 4)
  assert calls == [("org/prompts", "validation")] and out.texts == ["hello", "a b"]
  with pytest.raises(data.DataError, match="org/missing: not a local file.*doesn't exist"):
    data.load_prompts(data.DataSpec("org/missing"), tok, 4)
  datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "saved"))
  out = data.load_prompts(data.DataSpec(str(tmp_path / "saved")), tok, 4)
  assert out.texts == ["hello", "a b"]


# ---------------------------------------------------------------------------- tokenizers


def test_check_tokenizer(tok):
  data.check_tokenizer(tok, len(tok), "policy")
  with pytest.raises(data.DataError, match=r"policy: the tokenizer has 25 tokens but the "
                     r"model's vocab_size is 10"):
    data.check_tokenizer(tok, 10, "policy")
  no_pad = make_tokenizer()
  no_pad.pad_token = None
  with pytest.raises(data.DataError, match="no pad_token.*pad_token = tokenizer.eos_token"):
    data.check_tokenizer(no_pad, 100, "rm")
  with pytest.raises(data.DataError, match="no pad_token"):
    data.load_text(data.DataSpec("unused.jsonl"), no_pad, 8)
  data.check_same_tokenizer(tok, make_tokenizer())
  with pytest.raises(data.DataError, match="policy and reward model tokenizers differ"):
    data.check_same_tokenizer(tok, make_tokenizer(vocab_extra=2))


# ---------------------------------------------------------------------------- batches


def toy_arrays(n):
  return dict(x=np.arange(n), y=np.arange(n * 2).reshape(n, 2))


def test_batches_deterministic_and_exhaustive():
  n, b = 23, 5
  it = data.BatchIterator(toy_arrays(n), b, seed=7)
  epoch0 = [next(it) for _ in range(it.steps_per_epoch)]
  seen = np.concatenate([e["x"] for e in epoch0])
  assert len(seen) == len(set(seen)) == (n // b) * b  # each at most once, 3 dropped
  np.testing.assert_array_equal(epoch0[0]["y"], toy_arrays(n)["y"][epoch0[0]["x"]])
  again = data.BatchIterator(toy_arrays(n), b, seed=7)
  assert all((next(again)["x"] == e["x"]).all() for e in epoch0)
  other = data.BatchIterator(toy_arrays(n), b, seed=8)
  assert not all((next(other)["x"] == e["x"]).all() for e in epoch0)
  epoch1 = np.concatenate([next(it)["x"] for _ in range(it.steps_per_epoch)])
  assert it.state() == {"epoch": 1, "index": 4} and not (epoch1 == seen).all()
  full = data.BatchIterator(toy_arrays(n), b, seed=7, drop_last=False)
  xs = np.concatenate([next(full)["x"] for _ in range(full.steps_per_epoch)])
  assert sorted(set(xs)) == list(range(n)) and len(xs) == 25  # all seen, last batch filled
  ordered = data.BatchIterator(toy_arrays(n), b, seed=7, shuffle=False)
  assert next(ordered)["x"].tolist() == [0, 1, 2, 3, 4]


def test_batches_host_slices_concatenate_to_global():
  arrays, b = toy_arrays(40), 8
  one = data.BatchIterator(arrays, b, seed=3)
  two = [data.BatchIterator(arrays, b, seed=3, process_index=p, process_count=2)
         for p in range(2)]
  for _ in range(12):  # crosses an epoch boundary (5 steps per epoch)
    want = next(one)
    parts = [next(h) for h in two]
    assert parts[0]["x"].shape == (4,)
    for k in arrays:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])


def test_batches_resume_exactly():
  arrays = toy_arrays(30)
  it = data.BatchIterator(arrays, 4, seed=1)
  for _ in range(10):  # epoch 1, mid-way
    next(it)
  state = json.loads(json.dumps(it.state()))
  rest = [next(it)["x"] for _ in range(9)]
  resumed = data.BatchIterator(arrays, 4, seed=1)
  resumed.restore(state)
  for want in rest:
    np.testing.assert_array_equal(next(resumed)["x"], want)
  resumed.restore({})
  assert resumed.state() == {"epoch": 0, "index": 0}
  with pytest.raises(data.DataError, match="index"):
    resumed.restore({"epoch": 0, "index": -1})
  with pytest.raises(data.DataError, match="fewer than one global batch"):
    data.BatchIterator(toy_arrays(3), 4, seed=0)
  with pytest.raises(data.DataError, match="divisible"):
    data.BatchIterator(arrays, 5, seed=0, process_count=2)


# ---------------------------------------------------------------------------- speed


def test_many_rows_load_quickly(tmp_path, tok):
  n = 20000
  rng = np.random.default_rng(0)
  rows = [dict(prompt=" ".join(rng.choice(WORDS, 6)), completion=" ".join(rng.choice(WORDS, 8)))
          for _ in range(n)]
  path = write(tmp_path / "big.jsonl", rows)
  start = time.perf_counter()
  out = data.load_sft(data.DataSpec(path), tok, 8, 16)
  assert time.perf_counter() - start < 30  # guards against quadratic blow-ups
  assert out.arrays["input_ids"].shape == (n, 16) and out.report.n_used == n
