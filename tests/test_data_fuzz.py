"""Fuzz: malformed rows thrown at every loader end in a clean skip or a `DataError`.

Rows are random JSON values (junk types, missing keys, nested lists/objects, huge strings,
unicode including lone surrogates) mixed with valid rows and unparseable lines. Whatever
comes in, a loader either returns arrays whose report accounts for every row, or raises
`data.DataError` — never any other exception.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax import data
from test_data import WORDS, make_tokenizer

TOK = make_tokenizer()
CHAT_TOK = make_tokenizer(chat=True)
KEYS = ["prompt", "completion", "chosen", "rejected", "responses", "ranks", "text",
        "messages", "role", "content", "junk"]

words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
texts = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join),
    st.text(max_size=30),
    st.sampled_from(["", "   ", "\ud800", "a\udfff b", "日本語 テキスト", "\x00", "<eos>",
                     "hello " * 3000]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=12)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                           "content": texts}),
    json_values), max_size=4)
ranked = st.fixed_dictionaries({
    "prompt": st.one_of(words, texts),
    "responses": st.lists(st.one_of(words, words, texts, json_values), max_size=5),
    "ranks": st.lists(st.one_of(st.integers(-3, 3), st.integers(-3, 3), json_values),
                      max_size=5)})
ranked_ok = st.integers(2, 4).flatmap(lambda k: st.fixed_dictionaries({
    "prompt": words, "responses": st.lists(words, min_size=k, max_size=k),
    "ranks": st.lists(st.integers(0, 2), min_size=k, max_size=k)}))
good_ish = st.fixed_dictionaries({}, optional={k: st.one_of(texts, json_values)
                                               for k in KEYS})
mostly_valid = st.fixed_dictionaries(  # so that the success path is exercised too
    {k: st.one_of(words, words, words, texts)
     for k in ("prompt", "completion", "chosen", "rejected", "text")},
    optional={"junk": json_values})
rows = st.lists(st.one_of(
    json_values, good_ish, ranked, ranked_ok, mostly_valid,
    st.fixed_dictionaries({"messages": messages}),
    st.sampled_from(["{broken", "[1, 2", "nul\x00l", "{\"prompt\": NaN}", "1e999999",
                     "{\"prompt\": " + "7" * 5000 + "}", "[" * 50000 + "]" * 50000,
                     "\ufeff{\"text\": \"a\"}", "{\"text\": \"a\u2028b\"}"]),
), max_size=8)


def write_lines(path, items):
  # surrogatepass: a lone surrogate becomes bytes that are not valid UTF-8 — itself a malformed
  # file the loader must report cleanly.
  with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
    for item in items:
      f.write((item if isinstance(item, str) else json.dumps(item)).replace("\n", " ") + "\n")


LOADERS = {
    "sft": lambda spec, tok: data.load_sft(spec, tok, 16, 32),
    "rm": lambda spec, tok: data.load_comparisons(spec, tok, 16, 32, k_max=3),
    "prompts": lambda spec, tok: data.load_prompts(spec, tok, 16),
    "text": lambda spec, tok: data.load_text(spec, tok, 16, pack=False),
    "packed": lambda spec, tok: data.load_text(spec, tok, 16, pack=True),
}


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(items=rows, kind=st.sampled_from(sorted(LOADERS)), chat=st.booleans(),
       mode=st.sampled_from(["skip", "error"]), suffix=st.sampled_from(["jsonl", "json"]))
def test_malformed_rows_skip_or_data_error(items, kind, chat, mode, suffix):
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"fuzz.{suffix}")
    if suffix == "json" and all(not isinstance(i, str) for i in items):
      with open(path, "w") as f:
        json.dump(items, f)
    else:
      write_lines(path, items)
    spec = data.DataSpec(path, on_bad_row=mode)
    try:
      out = LOADERS[kind](spec, CHAT_TOK if chat else TOK)
    except data.DataError as e:
      assert "fuzz" in str(e)  # names the file
      return
  report = out.report
  assert report.n_used >= 1 and report.n_used + report.n_skipped == report.n_rows
  if mode == "error":
    assert report.n_skipped == 0
  for arr in out.arrays.values():
    assert arr.dtype in (np.int32, np.bool_) and len(arr) == len(out)
  ids = out.arrays["input_ids"]
  assert ids.min() >= 0 and ids.max() < len(TOK)
  str(report)
