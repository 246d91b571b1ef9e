"""The pure-function model API: shapes, padding, KV cache, dtypes, axes, presets.

References here are independent of the code under test: published parameter counts, a
float64 numpy attention for the mask semantics, and the padding-free forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import api


def _tiny(**kw):
  return models.get_preset("tiny").replace(**kw)


GPT2_TINY = models.ModelConfig(
    family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
    head_dim=8, intermediate_size=64, max_position_embeddings=32, norm_type="layernorm",
    norm_eps=1e-5, activation="gelu_new", gated_mlp=False, position_type="learned",
    qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True)
NEOX_TINY = models.ModelConfig(
    family="gpt_neox", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
    head_dim=8, intermediate_size=64, norm_type="layernorm", norm_eps=1e-5, activation="gelu",
    gated_mlp=False, rotary_pct=0.5, parallel_residual=True, qkv_bias=True, out_bias=True,
    mlp_bias=True)
MISTRAL_TINY = _tiny(family="mistral", sliding_window=3)


def _padded_batch(vocab, t=10):
  rng = np.random.RandomState(0)
  ids = rng.randint(1, vocab, size=(3, t))
  mask = np.ones((3, t), np.int32)
  mask[1, :4] = 0           # left padded prompt
  mask[2, :2] = 0
  mask[2, -3:] = 0          # left AND right padded
  return jnp.asarray(np.where(mask == 1, ids, 0)), jnp.asarray(mask)


@pytest.mark.parametrize("kind", ["causal", "scalar"])
def test_init_tree_and_axes(kind):
  cfg = _tiny()
  params = models.init(cfg, jax.random.key(0), kind=kind)
  assert set(params) == ({"backbone", "lm_head"} if kind == "causal" else {"backbone", "head"})
  axes = models.logical_axes(cfg, kind=kind)
  is_axes = lambda x: isinstance(x, tuple)
  # Same structure, and each name tuple has one entry per array dim.
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
  jax.tree.map(lambda a, p: None if len(a) == p.ndim else pytest.fail(f"{a} vs {p.shape}"),
               axes, params, is_leaf=is_axes)
  allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", None}
  assert {n for a in jax.tree.leaves(axes, is_leaf=is_axes) for n in a} <= allowed
  assert axes["backbone"]["embed"]["embedding"] == ("vocab", "embed")
  assert axes["backbone"]["layer_0"]["attn"]["k"]["kernel"] == ("embed", "kv_heads", "head_dim")
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    assert all(isinstance(p.key, str) for p in path)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_tied_has_no_lm_head():
  params = models.init(GPT2_TINY, 0)
  assert "lm_head" not in params
  assert "pos_embed" in params["backbone"]


@pytest.mark.parametrize("name,count", [
    ("gpt2", 124_439_808), ("pythia-160m", 162_322_944), ("qwen2-0.5b", 494_032_768),
    ("llama-1b", 1_235_814_400), ("llama-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096)])
def test_preset_param_counts(name, count):
  """Counts published for the HF checkpoints (no allocation: abstract params)."""
  abstract = api.abstract_params(models.get_preset(name))
  assert models.param_count(abstract) == count


def test_get_preset_errors_list_names():
  with pytest.raises(ValueError, match="tiny"):
    models.get_preset("gpt5")
  assert models.get_preset("tiny", dtype="bfloat16").dtype == "bfloat16"


def _np_reference_attention_mask(mask, window=None):
  t = mask.shape[1]
  q = np.arange(t)[:, None]
  k = np.arange(t)[None, :]
  allowed = (k <= q) & (mask[:, None, :] == 1)
  if window is not None:
    allowed &= k > q - window
  return allowed


def test_attention_mask_semantics():
  _, mask = _padded_batch(10)
  for cfg in (_tiny(), MISTRAL_TINY):
    got = models.transformer.attention_mask(cfg, jnp.arange(10), jnp.arange(10), mask)
    np.testing.assert_array_equal(np.asarray(got),
                                  _np_reference_attention_mask(np.asarray(mask), cfg.sliding_window))


@pytest.mark.parametrize("cfg", [_tiny(), GPT2_TINY, NEOX_TINY], ids=["llama", "gpt2", "neox"])
def test_padding_invariance(cfg):
  """Logits on real tokens do not depend on where the padding is (left, right or both)."""
  params = models.init(cfg, jax.random.key(1))
  ids, mask = _padded_batch(cfg.vocab_size)
  out = models.logits(cfg, params, ids, mask)
  assert out.dtype == jnp.float32 and out.shape == ids.shape + (cfg.vocab_size,)
  assert np.isfinite(np.asarray(out)).all()   # pad rows too: no NaN from fully masked rows
  # The same rows with their real tokens moved to the front (right padding only).
  real = np.asarray(mask).astype(bool)
  order = np.argsort(~real, axis=1, kind="stable")
  shifted_ids = np.take_along_axis(np.asarray(ids), order, axis=1)
  shifted_mask = np.take_along_axis(np.asarray(mask), order, axis=1)
  shifted = models.logits(cfg, params, shifted_ids, shifted_mask)
  for b in range(ids.shape[0]):
    np.testing.assert_allclose(np.asarray(out[b])[real[b]],
                               np.asarray(shifted[b])[shifted_mask[b] == 1], atol=1e-5)


@pytest.mark.parametrize("cfg", [_tiny(), GPT2_TINY, NEOX_TINY, MISTRAL_TINY],
                         ids=["llama", "gpt2", "neox", "mistral"])
def test_forward_with_cache_matches_full_forward(cfg):
  """Prefill the (left-padded) prompt, then one token per step, as the sampler does."""
  params = models.init(cfg, jax.random.key(2))
  ids, mask = _padded_batch(cfg.vocab_size)
  mask = mask.at[2, -3:].set(1)   # prompts are left padded only
  full = models.logits(cfg, params, ids, mask)
  prompt_len, total = 6, ids.shape[1]
  max_len = total + 2               # spare, never-written slots stay masked
  kv_mask = jnp.zeros((ids.shape[0], max_len), jnp.int32).at[:, :total].set(mask)
  positions = api.positions_from_mask(mask)
  cache = models.init_cache(cfg, ids.shape[0], max_len)
  step = jax.jit(models.forward_with_cache, static_argnums=0)   # also works inside a jit
  out, cache = step(cfg, params, ids[:, :prompt_len], positions[:, :prompt_len], kv_mask,
                    cache, 0)
  outs = [out]
  for i in range(prompt_len, total):
    out, cache = step(cfg, params, ids[:, i:i + 1], positions[:, i:i + 1], kv_mask, cache,
                      jnp.int32(i))
    outs.append(out)
  got = jnp.concatenate(outs, axis=1)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5)
  assert set(cache) == {f"layer_{i}" for i in range(cfg.num_layers)}
  assert cache["layer_0"]["k"].shape == (3, cfg.num_kv_heads, max_len, cfg.head_dim)


def test_bf16_close_to_float32():
  cfg = _tiny()
  params = models.init(cfg, jax.random.key(3))
  ids, mask = _padded_batch(cfg.vocab_size)
  ref = models.logits(cfg, params, ids, mask)
  bf16 = cfg.replace(dtype="bfloat16")
  out = models.logits(bf16, params, ids, mask)
  assert out.dtype == jnp.float32
  real = np.asarray(mask).astype(bool)
  assert float(np.max(np.abs(np.asarray(out)[real] - np.asarray(ref)[real]))) < 0.05
  assert models.init_cache(bf16, 2, 4)["layer_0"]["k"].dtype == jnp.bfloat16


def test_remat_grads_inside_outer_jit():
  """models.* called inside a user's jax.jit(jax.grad(...)); remat changes nothing."""
  cfg = _tiny()
  params = models.init(cfg, jax.random.key(3))
  ids, mask = _padded_batch(cfg.vocab_size)

  def grads(c):
    loss = lambda p: jnp.sum(models.logits(c, p, ids, mask)[..., 0] * mask)
    return jax.jit(jax.grad(loss))(params)

  g_ref, g_remat = grads(cfg), grads(cfg.replace(remat=True))
  assert jax.tree.structure(g_ref) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_ref, g_remat)


def test_scalar_values_and_scores():
  cfg = _tiny()
  policy = models.init(cfg, jax.random.key(4))
  rm = models.causal_to_scalar(cfg, policy, jax.random.key(5))
  assert rm["backbone"] is policy["backbone"]
  ids, mask = _padded_batch(cfg.vocab_size)
  values = models.values(cfg, rm, ids, mask)
  assert values.shape == ids.shape and values.dtype == jnp.float32
  index = jnp.array([9, 9, 6])      # last real token of each row
  scores = models.scores(cfg, rm, ids, mask, index)
  np.testing.assert_allclose(scores, values[jnp.arange(3), index], atol=1e-6)
  # Reference: the head applied by hand to the hidden states.
  hidden = models.hidden_states(cfg, rm, ids, mask)
  by_hand = hidden @ rm["head"]["kernel"][:, 0] + rm["head"]["bias"][0]
  np.testing.assert_allclose(values, by_hand, atol=1e-5)
  with pytest.raises(ValueError, match="causal"):
    models.logits(cfg, rm, ids, mask)
  with pytest.raises(ValueError, match="scalar"):
    models.values(cfg, policy, ids, mask)


def test_head_values_on_sliced_hidden_states_equal_values():
  cfg = models.get_preset("tiny")
  params = models.causal_to_scalar(cfg, models.init(cfg, jax.random.key(0)), jax.random.key(1))
  ids = np.array([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 9]], np.int32)
  mask = (ids != 0).astype(np.int32)
  hidden = models.hidden_states(cfg, params, ids, mask)
  np.testing.assert_allclose(np.asarray(models.head_values(cfg, params, hidden[:, 2:5])),
                             np.asarray(models.values(cfg, params, ids, mask))[:, 2:5],
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="scalar"):
    models.head_values(cfg, models.init(cfg, jax.random.key(0)), hidden)
