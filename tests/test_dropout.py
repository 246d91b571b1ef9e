"""Training-time dropout: residual (`cfg.dropout`) and attention (`cfg.attention_dropout`).

References are independent of the code under test where possible: a float64 numpy inverted
dropout given the same Bernoulli keep mask, the deterministic forward pass (rate 0 or no
key must be bit-identical to it), and single-site blocks whose other branch is zeroed so
the block's residual update is exactly one dropped site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import api, transformer

_SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
              head_dim=8, intermediate_size=64, max_position_embeddings=32)
CFGS = {
    "llama": models.get_preset("tiny"),
    # GPT-2 layout (learned positions, LayerNorm, biases, tied embeddings), shrunk.
    "gpt2": models.get_preset("gpt2", **_SMALL),
    # Parallel residual: the MLP branch reads the block input, not the attention output.
    "neox": models.get_preset("pythia-160m", **_SMALL),
}
RATES = dict(dropout=0.2, attention_dropout=0.1)


def _batch(cfg, b=3, t=10):
  rng = np.random.RandomState(0)
  ids = rng.randint(1, cfg.vocab_size, size=(b, t))
  mask = np.ones((b, t), np.int32)
  mask[1, :3] = 0   # left padded
  mask[2, -2:] = 0  # right padded
  return jnp.asarray(np.where(mask == 1, ids, 0)), jnp.asarray(mask)


@pytest.fixture(scope="module", params=sorted(CFGS))
def setup(request):
  cfg = CFGS[request.param]
  params = models.init(cfg, jax.random.key(0))
  scalar = models.causal_to_scalar(cfg, params, jax.random.key(1))
  return cfg, params, scalar, _batch(cfg)


def _eq(a, b):
  return np.array_equal(np.asarray(a), np.asarray(b))


# --- the helper against a float64 reference -------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_dropout_matches_numpy_reference(dtype, rtol):
  rate, key = 0.3, jax.random.key(7)
  x = jax.random.normal(jax.random.key(8), (64, 256), jnp.float32).astype(dtype)
  out = transformer.dropout(x, rate, key)
  assert out.dtype == dtype and out.shape == x.shape
  keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, x.shape))
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  ref = np.where(keep, x64 / (1.0 - rate), 0.0)
  got = np.asarray(out.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(got, ref, rtol=rtol, atol=0)
  assert np.all(got[~keep] == 0)
  # The zeroed fraction is `rate`: 5 binomial standard deviations over 16384 entries.
  n = keep.size
  assert abs((~keep).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)


def test_dropout_is_unbiased_and_identity_without_key_or_rate():
  rate = 0.25
  x = jax.random.normal(jax.random.key(0), (16,), jnp.float32)
  keys = jax.random.split(jax.random.key(1), 8000)
  outs = jax.vmap(lambda k: transformer.dropout(x, rate, k))(keys)
  # E[dropout(x)] = x; per-entry std of the mean is |x| sqrt(p / (1-p) / n).
  sigma = np.abs(np.asarray(x)) * np.sqrt(rate / (1 - rate) / keys.shape[0])
  assert np.all(np.abs(np.asarray(outs.mean(0)) - np.asarray(x)) < 6 * sigma + 1e-7)
  assert transformer.dropout(x, rate, None) is x
  assert transformer.dropout(x, 0.0, keys[0]) is x


# --- off by default: bit-identical deterministic path ---------------------------------


def test_zero_rate_or_no_key_is_bit_identical(setup):
  cfg, params, scalar, (ids, mask) = setup
  key = jax.random.key(3)
  idx = jnp.array([9, 9, 7])
  on = cfg.replace(**RATES)
  base_h = models.hidden_states(cfg, params, ids, mask)
  base_l = models.logits(cfg, params, ids, mask)
  base_v = models.values(cfg, scalar, ids, mask)
  base_s = models.scores(cfg, scalar, ids, mask, idx)
  for c, k in [(cfg, key), (on, None)]:  # rate 0 with a key; rates > 0 without one
    assert _eq(models.hidden_states(c, params, ids, mask, dropout_rng=k), base_h)
    assert _eq(models.logits(c, params, ids, mask, dropout_rng=k), base_l)
    assert _eq(models.values(c, scalar, ids, mask, dropout_rng=k), base_v)
    assert _eq(models.scores(c, scalar, ids, mask, idx, dropout_rng=k), base_s)


def test_key_at_rate_zero_reuses_the_deterministic_compilation():
  cfg = models.get_preset("tiny", num_layers=1)
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg)
  models.hidden_states(cfg, params, ids, mask)
  before = api._hidden_jit._cache_size()
  models.hidden_states(cfg, params, ids, mask, dropout_rng=jax.random.key(1))
  assert api._hidden_jit._cache_size() == before


def test_deterministic_graph_has_no_rng_ops(setup):
  cfg, params, _, (ids, mask) = setup
  on = cfg.replace(**RATES)
  jaxpr = lambda c, k: str(jax.make_jaxpr(  # noqa: E731
      lambda p, k: models.logits(c, p, ids, mask, dropout_rng=k))(params, k))
  plain = str(jax.make_jaxpr(lambda p: models.logits(cfg, p, ids, mask))(params))
  for text in (jaxpr(on, None), jaxpr(cfg, jax.random.key(0))):
    assert "random_bits" not in text and "threefry" not in text
  assert str(jax.make_jaxpr(lambda p: models.logits(on, p, ids, mask))(params)) == plain
  assert "random_bits" in jaxpr(on, jax.random.key(0))


def test_forward_with_cache_never_drops():
  cfg = CFGS["gpt2"]
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg, t=6)
  pos = api.positions_from_mask(mask)
  run = lambda c: models.forward_with_cache(  # noqa: E731
      c, params, ids, pos, mask, models.init_cache(c, 3, 6), 0)[0]
  assert _eq(run(cfg.replace(dropout=0.5, attention_dropout=0.5)), run(cfg))
  model = api._model(cfg.replace(dropout=0.5), params)
  with pytest.raises(ValueError, match="KV-cache"):
    model.backbone(ids, pos, jnp.ones((3, 6, 6), bool), models.init_cache(cfg, 3, 6), 0,
                   dropout_rng=jax.random.key(0))


# --- on with a key ---------------------------------------------------------------------


def test_keys_change_and_reproduce_outputs(setup):
  cfg, params, scalar, (ids, mask) = setup
  on = cfg.replace(**RATES)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a = models.logits(on, params, ids, mask, dropout_rng=k1)
  assert _eq(models.logits(on, params, ids, mask, dropout_rng=k1), a)
  assert not _eq(models.logits(on, params, ids, mask, dropout_rng=k2), a)
  assert not _eq(a, models.logits(cfg, params, ids, mask))
  assert np.isfinite(np.asarray(a)).all()
  idx = jnp.array([9, 9, 7])
  s1 = models.scores(on, scalar, ids, mask, idx, dropout_rng=k1)
  assert _eq(models.scores(on, scalar, ids, mask, idx, dropout_rng=k1), s1)
  assert not _eq(s1, models.scores(on, scalar, ids, mask, idx, dropout_rng=k2))
  assert not _eq(s1, models.scores(cfg, scalar, ids, mask, idx))


@pytest.mark.parametrize("rates", [dict(dropout=0.2), dict(attention_dropout=0.2)])
def test_each_rate_alone_is_applied(rates):
  cfg = CFGS["llama"]
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg)
  key = jax.random.key(1)
  on = models.values(cfg.replace(**rates), models.causal_to_scalar(cfg, params, 1), ids, mask,
                     dropout_rng=key)
  off = models.values(cfg, models.causal_to_scalar(cfg, params, 1), ids, mask)
  assert not _eq(on, off) and np.isfinite(np.asarray(on)).all()


def test_tiny_rate_matches_deterministic(setup):
  cfg, params, _, (ids, mask) = setup
  tiny = cfg.replace(dropout=1e-9, attention_dropout=1e-9)
  got = models.hidden_states(tiny, params, ids, mask, dropout_rng=jax.random.key(5))
  np.testing.assert_allclose(np.asarray(got), np.asarray(models.hidden_states(cfg, params, ids,
                                                                             mask)),
                             rtol=1e-6, atol=1e-6)


def test_site_keys_are_distinct():
  key = jax.random.key(0)
  keys = [transformer.dropout_key(key, 0, "embedding")] + [
      transformer.dropout_key(key, layer, site)
      for layer in range(4) for site in transformer.BLOCK_DROPOUT_SITES]
  data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
  assert len(data) == len(keys)


def test_embedding_site_is_after_position_sum():
  # No blocks and RMSNorm (no bias): hidden = final_norm(dropout(tok + pos)), so hidden is
  # zero exactly where the embedding mask drops; were the dropout before the position add,
  # no entry would be zero.
  cfg = models.get_preset("tiny", num_layers=0, position_type="learned", dropout=0.3)
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg)
  key = jax.random.key(4)
  h = np.asarray(models.hidden_states(cfg, params, ids, mask, dropout_rng=key))
  keep = np.asarray(jax.random.bernoulli(transformer.dropout_key(key, 0, "embedding"), 0.7,
                                         h.shape))
  np.testing.assert_array_equal(h == 0, ~keep)


@pytest.mark.parametrize("family", ["llama", "neox"])
@pytest.mark.parametrize("site,zeroed", [("attention_output", "mlp.down"),
                                         ("mlp_output", "attn.o")])
def test_residual_site_in_block(family, site, zeroed):
  """With the other branch's output projection zeroed, block(x) - x is one dropped site."""
  rate = 0.4
  cfg = CFGS[family].replace(dropout=rate)
  params = models.init(cfg, jax.random.key(0))
  module, proj = zeroed.split(".")
  layer = params["backbone"]["layer_0"]
  layer = {**layer, module: {**layer[module],
                             proj: jax.tree.map(jnp.zeros_like, layer[module][proj])}}
  params = {**params, "backbone": {**params["backbone"], "layer_0": layer}}
  block = api._model(cfg, params).backbone.layer_0
  b, t, d = 2, 6, cfg.hidden_size
  x = jax.random.normal(jax.random.key(1), (b, t, d), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  rope = transformer.rope_tables(cfg, positions)
  mask_bts = transformer.attention_mask(cfg, jnp.arange(t), jnp.arange(t), jnp.ones((b, t)))
  key = jax.random.key(9)
  keys = tuple(transformer.dropout_key(key, 0, s) for s in transformer.BLOCK_DROPOUT_SITES)
  delta0 = np.asarray(block(x, rope, mask_bts)[0] - x, np.float64)
  delta = np.asarray(block(x, rope, mask_bts, None, None, keys)[0] - x, np.float64)
  keep = np.asarray(jax.random.bernoulli(transformer.dropout_key(key, 0, site), 1 - rate,
                                         (b, t, d)))
  assert np.abs(delta0).max() > 1e-3
  np.testing.assert_allclose(delta, np.where(keep, delta0 / (1 - rate), 0.0), rtol=1e-4,
                             atol=1e-6)


# --- training transforms: grad, remat, bf16, scan, sharding ----------------------------


def _loss(cfg, params, ids, mask, key):
  logits = models.logits(cfg, params, ids, mask, dropout_rng=key)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 1] * mask)


def test_gradients_flow_and_remat_keeps_masks():
  cfg = CFGS["gpt2"]
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg)
  on = cfg.replace(**RATES)
  key = jax.random.key(6)
  grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
  g_on = grad(on, params, ids, mask, key)
  g_off = grad(on, params, ids, mask, None)
  leaves_on, leaves_off = jax.tree.leaves(g_on), jax.tree.leaves(g_off)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves_on)
  assert any(not _eq(a, b) for a, b in zip(leaves_on, leaves_off))
  # Rematerialisation must recompute the same masks in the backward pass.
  g_remat = grad(on.replace(remat=True), params, ids, mask, key)
  for a, b in zip(leaves_on, jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bf16_remat():
  cfg = CFGS["llama"].replace(dtype="bfloat16", remat=True)
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg)
  on = cfg.replace(**RATES)
  key = jax.random.key(2)
  h = models.hidden_states(on, params, ids, mask, dropout_rng=key)
  assert h.dtype == jnp.bfloat16 and np.isfinite(np.asarray(h, np.float32)).all()
  assert _eq(models.hidden_states(on, params, ids, mask, dropout_rng=key), h)
  base = models.hidden_states(cfg, params, ids, mask)
  assert not _eq(h, base)
  assert _eq(models.hidden_states(on, params, ids, mask), base)
  g = jax.grad(_loss, argnums=1)(on, params, ids, mask, key)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_inside_jit_and_scan_matches_direct_calls():
  cfg = CFGS["llama"].replace(**RATES)
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg)
  keys = jax.random.split(jax.random.key(3), 3)

  @jax.jit
  def scanned(p, ks):
    return jax.lax.scan(lambda c, k: (c, _loss(cfg, p, ids, mask, k)), 0, ks)[1]

  want = [_loss(cfg, params, ids, mask, k) for k in keys]
  np.testing.assert_allclose(np.asarray(scanned(params, keys)), np.asarray(want), rtol=1e-6)


def test_batch_sharded_activations_match_unsharded():
  cfg = CFGS["gpt2"].replace(**RATES)
  params = models.init(cfg, jax.random.key(0))
  ids, mask = _batch(cfg, b=4)
  key = jax.random.key(8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  fn = jax.jit(lambda p, i, m, k: models.hidden_states(cfg, p, i, m, dropout_rng=k))
  got = fn(params, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding),
           key)
  want = models.hidden_states(cfg, params, ids, mask, dropout_rng=key)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# --- config --------------------------------------------------------------------------------


def test_config_rates():
  cfg = models.get_preset("tiny")
  assert cfg.dropout == 0.0 and cfg.attention_dropout == 0.0
  old = {k: v for k, v in cfg.to_dict().items() if k not in ("dropout", "attention_dropout")}
  assert models.ModelConfig.from_dict(old) == cfg  # configs saved before the fields existed
  on = cfg.replace(dropout=0.2)
  assert models.ModelConfig.from_dict(on.to_dict()) == on and hash(on) != hash(cfg)
  for bad in (dict(dropout=1.0), dict(dropout=-0.1), dict(attention_dropout=1.5)):
    with pytest.raises(ValueError, match="dropout"):
      cfg.replace(**bad)
