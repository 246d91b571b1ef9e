"""An exported reward model scores in transformers at the same token as `models.scores`.

transformers' *ForSequenceClassification reads the rightmost token that is not
`config.pad_token_id`; our reward model reads the EOS after each response. With pad = EOS
in our config, a naive export would make transformers read the token before that EOS.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the transformers reference")
transformers = pytest.importorskip("transformers")

from rlhf_jax import models  # pylint: disable=wrong-import-position

EOS = 2
TOL = 1e-4
CFGS = {
    "llama": dict(family="llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=48,
                  max_position_embeddings=64),
    "gpt2": dict(family="gpt2", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                 num_kv_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                 norm_type="layernorm", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
                 position_type="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                 tie_word_embeddings=True),
}


class _Tok:
  """Only `len` matters to save_hf: how many ids a tokenizer can produce."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n


def _scalar_model(family):
  cfg = models.ModelConfig(**CFGS[family], eos_token_id=EOS, pad_token_id=EOS)
  params = models.init(cfg, jax.random.key(0), kind="scalar")
  # A zero-initialised head would score every token 0 and hide an index mismatch.
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1),
                                               params["head"]["kernel"].shape)
  return cfg, params


def _right_padded_batch(pad_id):
  """Rows of different lengths, each ending with EOS, right padded with `pad_id`."""
  rng = np.random.RandomState(0)
  lengths = [9, 5, 7]
  ids = np.full((3, 10), pad_id, np.int64)
  mask = np.zeros((3, 10), np.int64)
  for b, n in enumerate(lengths):
    ids[b, :n - 1] = rng.randint(3, 40, size=n - 1)
    ids[b, n - 1] = EOS
    mask[b, :n] = 1
  ids[0, 3] = EOS  # an EOS inside a sequence must not confuse either reader
  return ids, mask, np.asarray(lengths) - 1


@pytest.mark.parametrize("family,tokenizer_len", [("llama", None), ("gpt2", None),
                                                  ("llama", 45)])
def test_transformers_reads_our_score_index(family, tokenizer_len, tmp_path):
  cfg, params = _scalar_model(family)
  tok = None if tokenizer_len is None else _Tok(tokenizer_len)
  models.save_hf(cfg, params, tmp_path, tokenizer=tok)
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  pad = hf_cfg["pad_token_id"]
  assert pad != EOS
  # With spare embedding rows the first unused id serves; otherwise one row is appended.
  assert (pad, hf_cfg["vocab_size"]) == ((45, 50) if tok else (50, 51))

  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  ids, mask, last = _right_padded_batch(pad)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  ours_ids = np.where(mask == 1, ids, EOS)  # our loaders pad with the tokenizer's pad (EOS)
  ours = np.asarray(models.scores(cfg, params, ours_ids, mask, last))
  np.testing.assert_allclose(theirs[:, 0].numpy(), ours, atol=TOL)
  # The index matters: the token before the EOS scores differently.
  before = np.asarray(models.scores(cfg, params, ours_ids, mask, last - 1))
  assert np.abs(before - ours).min() > 10 * TOL

  # Our own reload is exact (the appended row is dropped again).
  cfg2, params2 = models.load_hf(tmp_path)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_explicit_score_pad_id_is_checked(tmp_path):
  cfg, params = _scalar_model("llama")
  with pytest.raises(ValueError, match="score_pad_id"):
    models.save_hf(cfg, params, tmp_path, score_pad_id=EOS)
  models.save_hf(cfg, params, tmp_path, score_pad_id=49)
  assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == 49
