"""Tests for rlhf_jax.sampling: filtering vs a numpy reference, greedy vs transformers,
cache consistency vs one full forward pass, determinism, EOS handling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sampling

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22]]
N_NEW = 8

FAMILY_CFGS = {
    "llama": dict(family="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64,
                  max_position_embeddings=64),
    "gpt2": dict(family="gpt2", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                 num_kv_heads=4, head_dim=8, intermediate_size=128, max_position_embeddings=64,
                 norm_type="layernorm", norm_eps=1e-5, activation="gelu_new", gated_mlp=False,
                 position_type="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                 tie_word_embeddings=True),
}


_MODELS = {}


def _make_model(family):
  if family not in _MODELS:
    cfg = models.ModelConfig(**FAMILY_CFGS[family])
    params = models.init(cfg, jax.random.key(0), kind="causal")
    # Sharpen the (near-uniform) random-init distribution a little so that sampling,
    # filtering and EOS actually have something to bite on.
    _MODELS[family] = cfg, jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  return _MODELS[family]


@pytest.fixture(scope="module")
def model():
  """Most behaviour tests run on one family (each new config / static option compiles)."""
  return _make_model("llama")


@pytest.fixture(scope="module")
def batch():
  ids, mask = sampling.pad_prompts(PROMPTS, PAD)
  return jnp.asarray(ids), jnp.asarray(mask)


# ---------------------------------------------------------------- numpy references


def np_top_k(x: np.ndarray, k: int) -> np.ndarray:
  """Keep every entry >= the k-th largest of its row."""
  out = x.copy()
  for r in range(x.shape[0]):
    kth = np.sort(x[r])[::-1][k - 1]
    out[r, x[r] < kth] = -np.inf
  return out


def np_top_p(x: np.ndarray, p: float) -> np.ndarray:
  """Keep the smallest top set with cumulative prob >= p (and all ties of its smallest)."""
  out = x.copy()
  for r in range(x.shape[0]):
    row = x[r].astype(np.float64)
    srt = np.sort(row)[::-1]
    probs = np.exp(srt - srt[0])
    probs /= probs.sum()
    cum = np.cumsum(probs)
    m = int(np.searchsorted(cum, p)) + 1      # first prefix length with cum >= p
    m = min(max(m, 1), len(srt))
    out[r, row < srt[m - 1]] = -np.inf
  return out


def np_log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  mx = np.max(x, axis=-1, keepdims=True)
  return x - mx - np.log(np.sum(np.exp(x - mx), axis=-1, keepdims=True))


# ---------------------------------------------------------------- filter_logits / pad_prompts


def _random_logits(seed, with_ties):
  rs = np.random.RandomState(seed)
  if with_ties:   # small integer logits: many exact ties, including at the cut points
    return rs.randint(-3, 4, size=(6, 40)).astype(np.float32)
  return (rs.randn(6, 40) * 2).astype(np.float32)


@pytest.mark.parametrize("with_ties", [False, True])
@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_filter_top_k_matches_numpy(with_ties, k):
  x = _random_logits(k, with_ties)
  got = np.asarray(sampling.filter_logits(jnp.asarray(x), top_k=k))
  np.testing.assert_array_equal(got, np_top_k(x, k))


@pytest.mark.parametrize("with_ties", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_filter_top_p_matches_numpy(with_ties, p):
  x = _random_logits(int(p * 100), with_ties)
  want = np_top_p(x, p)
  got = np.asarray(sampling.filter_logits(jnp.asarray(x), top_p=p))
  np.testing.assert_array_equal(got, want)
  # A traced top_p gives the same answer, and a traced 1.0 is exactly a no-op.
  jitted = jax.jit(lambda x, p: sampling.filter_logits(x, top_p=p))
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(x), p)), want)
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(x), 1.0)), x)


def test_filter_top_k_then_top_p_matches_numpy():
  x = _random_logits(7, False)
  # top-p on the distribution renormalised over the top-k survivors.
  want = np_top_p(np_top_k(x, 8), 0.6)
  got = np.asarray(sampling.filter_logits(jnp.asarray(x), top_k=8, top_p=0.6))
  np.testing.assert_array_equal(got, want)


def test_filter_always_keeps_top_token():
  x = np.array([[10.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
  got = np.asarray(sampling.filter_logits(jnp.asarray(x), top_p=1e-6))
  np.testing.assert_array_equal(got[0], [10.0, -np.inf, -np.inf])
  np.testing.assert_array_equal(got[1], [0.0, 0.0, 0.0])   # three-way tie: all kept


def test_pad_prompts_left_pads():
  ids, mask = sampling.pad_prompts([[1, 2], [3, 4, 5], [6]], pad_id=9)
  np.testing.assert_array_equal(ids, [[9, 1, 2], [3, 4, 5], [9, 9, 6]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1], [0, 0, 1]])
  ids, _ = sampling.pad_prompts([[1]], pad_id=0, length=4)
  np.testing.assert_array_equal(ids, [[0, 0, 0, 1]])
  with pytest.raises(ValueError, match="empty"):
    sampling.pad_prompts([[1], []])
  with pytest.raises(ValueError, match="length=2"):
    sampling.pad_prompts([[1, 2, 3]], length=2)


# ---------------------------------------------------------------- greedy vs transformers


def _hf_config(family, transformers):
  common = dict(vocab_size=128, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
                initializer_range=0.2)
  if family == "llama":
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, **common)
  return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_transformers(family, tmp_path, batch):
  torch = pytest.importorskip("torch", reason="torch is the transformers reference; install "
                              "the test extra")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(_hf_config(family, transformers)).eval()
  hf.save_pretrained(tmp_path)
  cfg, params = models.load_hf(tmp_path)

  ids, mask = batch
  with torch.no_grad():
    want = hf.generate(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                       attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                       do_sample=False, max_new_tokens=N_NEW, pad_token_id=PAD)
  want = want[:, ids.shape[1]:].numpy()
  assert want.shape == (len(PROMPTS), N_NEW)   # no row stopped early

  out = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  np.testing.assert_array_equal(np.asarray(out.mask), np.ones_like(want))


# ---------------------------------------------------------------- cache consistency


def _full_pass_logprobs(cfg, params, ids, mask, out, temperature, top_k=0, top_p=1.0):
  """Log-probs of out.tokens from ONE forward pass over prompt + response (numpy f64)."""
  seq = jnp.concatenate([ids, out.tokens], axis=1)
  seq_mask = jnp.concatenate([mask, out.mask], axis=1)
  logits = np.asarray(models.logits(cfg, params, seq, seq_mask), np.float64)
  p = ids.shape[1]
  pred = logits[:, p - 1:-1] / temperature                       # [B, N, V]
  b, n, v = pred.shape
  flat = pred.reshape(b * n, v)
  if top_k:
    flat = np_top_k(flat, top_k)
  if top_p < 1.0:
    flat = np_top_p(flat, top_p)
  lp = np_log_softmax(flat).reshape(b, n, v)
  tok = np.asarray(out.tokens)
  return np.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("family,temperature,top_k,top_p", [
    ("llama", 1.0, 0, 1.0), ("llama", 0.7, 0, 1.0), ("llama", 0.7, 20, 0.9),
    ("gpt2", 1.0, 0, 1.0), ("gpt2", 0.7, 20, 0.9)])
def test_logprobs_match_full_forward(batch, family, temperature, top_k, top_p):
  cfg, params = _make_model(family)
  ids, mask = batch
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(1), N_NEW,
                          temperature=temperature, top_k=top_k, top_p=top_p)
  m = np.asarray(out.mask).astype(bool)
  assert m.all()   # no eos: every row generates every token
  want = _full_pass_logprobs(cfg, params, ids, mask, out, temperature, top_k, top_p)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4, rtol=0)


def test_greedy_logprobs_are_unfiltered(model, batch):
  cfg, params = model
  ids, mask = batch
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, temperature=0.5,
                          greedy=True, top_k=1, top_p=0.1)
  want = _full_pass_logprobs(cfg, params, ids, mask, out, 0.5)
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- rng, top_k=1, EOS, rows


def test_rng_determinism(model, batch):
  cfg, params = model
  ids, mask = batch
  a = sampling.generate(cfg, params, ids, mask, jax.random.key(3), N_NEW)
  b = sampling.generate(cfg, params, ids, mask, jax.random.key(3), N_NEW)
  c = sampling.generate(cfg, params, ids, mask, jax.random.key(4), N_NEW)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_top_k_1_equals_greedy(model, batch):
  cfg, params = model
  ids, mask = batch
  greedy = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, greedy=True)
  top1 = sampling.generate(cfg, params, ids, mask, jax.random.key(5), N_NEW, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
  np.testing.assert_allclose(np.asarray(top1.logprobs), 0.0, atol=1e-6)  # one-token support


def test_eos_stops_rows_independently(model, batch):
  cfg, params = model
  ids, mask = batch
  free = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, greedy=True)
  free_tok = np.asarray(free.tokens)
  eos = int(free_tok[0, 2])
  pad = 95
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, greedy=True,
                          eos_id=eos, pad_id=pad)
  tok, lp, m = (np.asarray(a) for a in out)
  for r in range(len(PROMPTS)):
    hits = np.flatnonzero(free_tok[r] == eos)
    stop = hits[0] if hits.size else N_NEW - 1     # index of the row's EOS (inclusive)
    np.testing.assert_array_equal(tok[r, :stop + 1], free_tok[r, :stop + 1])
    np.testing.assert_array_equal(m[r, :stop + 1], 1)
    np.testing.assert_array_equal(m[r, stop + 1:], 0)
    np.testing.assert_array_equal(tok[r, stop + 1:], pad)
    np.testing.assert_array_equal(lp[r, stop + 1:], 0.0)
    np.testing.assert_allclose(lp[r, :stop + 1], np.asarray(free.logprobs)[r, :stop + 1],
                               atol=1e-5)
  assert m[0].sum() <= 3


def test_eos_all_rows_stop_early(model, batch):
  """Every row stops at step 0 (eos = each row's first greedy token): loop exits early."""
  cfg, params = model
  ids, mask = batch
  first = np.asarray(sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW,
                                       greedy=True).tokens)[:, 0]
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, greedy=True,
                          eos_id=tuple(int(t) for t in first))
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], first)
  np.testing.assert_array_equal(np.asarray(out.mask)[:, 0], 1)
  np.testing.assert_array_equal(np.asarray(out.mask)[:, 1:], 0)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 1:], PAD)


def test_rows_independent_of_each_other(model, batch):
  """A row's greedy output does not depend on the other rows or on its place in the batch."""
  cfg, params = model
  ids, mask = batch
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(0), N_NEW, greedy=True)
  others = [[PROMPTS[0][0]] * 8, [3, 1, 4, 1, 5, 9], [2, 7]]
  for r, p in enumerate(PROMPTS):
    mixed = list(others)
    mixed[(r + 1) % 3] = p
    m_ids, m_mask = sampling.pad_prompts(mixed, PAD)
    got = sampling.generate(cfg, params, jnp.asarray(m_ids), jnp.asarray(m_mask),
                            jax.random.key(0), N_NEW, greedy=True)
    np.testing.assert_array_equal(np.asarray(got.tokens)[(r + 1) % 3], np.asarray(out.tokens)[r])
    np.testing.assert_allclose(np.asarray(got.logprobs)[(r + 1) % 3],
                               np.asarray(out.logprobs)[r], atol=1e-5)


def test_under_outer_jit_with_traced_temperature_and_top_p(model, batch):
  cfg, params = model
  ids, mask = batch

  @jax.jit
  def run(params, ids, mask, key, temperature, top_p):
    return sampling.generate(cfg, params, ids, mask, key, N_NEW, temperature=temperature,
                             top_k=20, top_p=top_p)

  got = run(params, ids, mask, jax.random.key(2), 0.7, 0.9)
  want = sampling.generate(cfg, params, ids, mask, jax.random.key(2), N_NEW, temperature=0.7,
                           top_k=20, top_p=0.9)
  for x, y in zip(got, want):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_bad_arguments_raise(model, batch):
  cfg, params = model
  ids, mask = batch
  right_padded = jnp.asarray(np.asarray(mask)[:, ::-1])
  with pytest.raises(ValueError, match="LEFT padded"):
    sampling.generate(cfg, params, ids, right_padded, jax.random.key(0), 4)
  with pytest.raises(ValueError, match="temperature"):
    sampling.generate(cfg, params, ids, mask, jax.random.key(0), 4, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(cfg, params, ids, mask, jax.random.key(0), 4, top_p=0.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compute_dtype_weights_leaves_the_bfloat16_forward_unchanged(family, batch):
  """Decoding casts float32 master matrices to the compute dtype once per call
  (`sampling.compute_dtype_weights`) instead of once per step; the model must compute
  exactly what it computes from the float32 weights (vectors such as LayerNorm's scale
  stay float32, since LayerNorm uses them un-cast)."""
  cfg, params = _make_model(family)
  cfg = dataclasses.replace(cfg, dtype="bfloat16")
  cast = sampling.compute_dtype_weights(cfg, params)
  for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(cast)):
    assert before.dtype == jnp.float32
    assert after.dtype == (jnp.bfloat16 if before.ndim >= 2 else jnp.float32)
    np.testing.assert_array_equal(np.asarray(after, np.float32),
                                  np.asarray(before.astype(after.dtype), np.float32))
  ids, mask = batch
  np.testing.assert_array_equal(
      np.asarray(models.logits(cfg, cast, ids, mask), np.float32),
      np.asarray(models.logits(cfg, params, ids, mask), np.float32))
