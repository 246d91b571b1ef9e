"""The decoder-only transformer as Flax NNX modules.

One `Model` covers every family in `config.FAMILIES`; the config switches norms, position
encoding, MLP shape, biases and residual layout. Every `nnx.Param` carries its logical axis
names in `out_sharding` metadata (the single source of truth for `models.logical_axes`).

Nothing outside `rlhf_jax/models/` should touch these classes: the rest of the project uses
the pure functions in `api.py` over plain param dicts.

Axis letters in names: B batch, T query length, S key length (cache slots), D model width,
N query heads, K key/value heads, G = N // K, H head width, F MLP width, V vocab.

Dropout (training only) follows GPT-2/GPT-3: `cfg.dropout` on the embedding output and on
each block's attention and MLP outputs before they join the residual stream,
`cfg.attention_dropout` on the attention probabilities. It runs only when a dropout key is
passed down; without one the traced graph is the plain forward pass.

Under a mesh the residual stream [B, T, D] is constrained to be split over the batch axes
(`constrain_batch`), after the embeddings and after every block. Without it, under `fsdp`
the lookup `take(embedding [V, D], ids [B, T])` meets the fsdp axis twice (the table's D,
the ids' B); XLA's propagation keeps D split and B whole, and every activation after it
was computed for the whole global batch on every device (a 1-layer Llama-8B PPO
experience on fsdp=8: 125 GiB of temporaries per device without, 17 GiB with).
"""

from __future__ import annotations

import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig

# Flax 0.12 would otherwise require an active mesh for any variable that names its axes.
flax.config.update("flax_always_shard_variable", False)

# Large negative but finite: a query row whose keys are all masked (a pad position) gets a
# uniform softmax instead of NaN.
MASK_VALUE = -0.5 * float(np.finfo(np.float32).max)

INIT_STD = 0.02
_normal = jax.nn.initializers.normal(stddev=INIT_STD)


def init_rule(leaf_name: str) -> str:
  """How a param named `leaf_name` is initialised: "normal" (std INIT_STD), "zeros", "ones"."""
  return {"kernel": "normal", "embedding": "normal", "bias": "zeros", "scale": "ones"}[leaf_name]


# The dropout sites of one block, in the order `dropout_key` numbers them.
BLOCK_DROPOUT_SITES = ("attention_probs", "attention_output", "mlp_output")


def dropout_key(key, layer: int, site: str):
  """The key of one dropout site: `site` of block `layer`, or site "embedding" (layer ignored).

  Sites are numbered 0 (embedding), then 1 + 3 * layer + BLOCK_DROPOUT_SITES.index(site), and
  each gets `jax.random.fold_in(key, number)`, so every mask in a forward pass is independent
  and reproducible from the one key.
  """
  if site == "embedding":
    return jax.random.fold_in(key, 0)
  return jax.random.fold_in(key, 1 + len(BLOCK_DROPOUT_SITES) * layer
                            + BLOCK_DROPOUT_SITES.index(site))


def dropout(x, rate: float, key):
  """Inverted dropout: zero each entry with probability `rate`, scale the rest by 1/(1-rate).

  The keep mask is `jax.random.bernoulli(key, 1 - rate, x.shape)`; the result stays in
  x.dtype. With `key` None or `rate` 0 this returns x itself (a Python-level branch, so the
  deterministic graph has no extra ops).
  """
  if key is None or rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def trace_mesh(*arrays):
  """The (abstract) mesh the traced computation runs on, or None.

  A mesh set with `jax.set_mesh` wins. Otherwise it is read off the arrays' types: under
  `jax.jit` with Auto-axis shardings (how the trainers run), an input placed on a mesh
  (a param, the token ids) carries that mesh in `jax.typeof(x).sharding.mesh` even though
  its spec there is not tracked, so the model needs no mesh argument. Arrays with no mesh
  (one device, plain jit, fresh `jnp.zeros`) give None.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh
  for x in arrays:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is not None and not mesh.empty:
      return mesh
  return None


def constrain_batch(x, mesh):
  """x with dim 0 constrained to the mesh's batch axes (`sharding.activation_batch_spec`).

  A no-op (x itself, no op traced) without a mesh or when no batch axis of size > 1
  divides dim 0, so single-device graphs are unchanged.
  """
  if mesh is None:
    return x
  spec = sharding.activation_batch_spec(mesh, x.shape[0], x.ndim)
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _param(value, names) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(names))


class Dense(nnx.Module):
  """Contracts the trailing `len(in_shape)` dims of x with a kernel of shape in + out."""

  def __init__(self, in_shape, out_shape, in_names, out_names, *, use_bias: bool,
               rngs: nnx.Rngs):
    self.n_in = len(in_shape)
    shape = tuple(in_shape) + tuple(out_shape)
    self.kernel = _param(_normal(rngs.params(), shape, jnp.float32), tuple(in_names) + tuple(out_names))
    if use_bias:
      self.bias = _param(jnp.zeros(tuple(out_shape), jnp.float32), out_names)
    else:
      self.bias = None

  def __call__(self, x, dtype):
    # One 2-D matmul [rows, in] @ [in, out]: the same sums as a tensordot over the trailing
    # dims, but XLA:CPU lowers the backward of a tensordot over [B, T, ...] with transposes
    # and copies of the activations (3x slower MLP backward on the built-in task's model,
    # docs/benchmarks.md); a [B*T, in] matrix needs none.
    kernel = self.kernel[...].astype(dtype)
    in_shape, out_shape = kernel.shape[:self.n_in], kernel.shape[self.n_in:]
    lead = x.shape[:x.ndim - self.n_in]
    y = (x.astype(dtype).reshape(math.prod(lead), math.prod(in_shape))
         @ kernel.reshape(math.prod(in_shape), math.prod(out_shape))).reshape(lead + out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class Embed(nnx.Module):
  """A lookup table [rows, D]."""

  def __init__(self, rows: int, dim: int, row_name: Optional[str], *, rngs: nnx.Rngs):
    self.embedding = _param(_normal(rngs.params(), (rows, dim), jnp.float32), (row_name, "embed"))

  def __call__(self, ids, dtype):
    return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


class Norm(nnx.Module):
  """LayerNorm (scale + bias) or RMSNorm (scale only), computed in float32."""

  def __init__(self, cfg: ModelConfig):
    self.rms = cfg.norm_type == "rmsnorm"
    self.eps = cfg.norm_eps
    d = cfg.hidden_size
    self.scale = _param(jnp.ones((d,), jnp.float32), ("embed",))
    self.bias = None if self.rms else _param(jnp.zeros((d,), jnp.float32), ("embed",))

  def __call__(self, x_btd):
    dtype = x_btd.dtype
    x = x_btd.astype(jnp.float32)
    if self.rms:
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
      # Llama casts back to the compute dtype before the scale; match it.
      return self.scale[...].astype(dtype) * x.astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...] + self.bias[...]).astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [rotary_dim // 2] with the config's RoPE scaling applied."""
  dim = cfg.rotary_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  kind = cfg.rope_scaling_type
  if kind is None:
    return inv_freq.astype(np.float32)
  if kind == "linear":
    return (inv_freq / cfg.rope_scaling_factor).astype(np.float32)
  if kind == "llama3":
    factor = cfg.rope_scaling_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise NotImplementedError(f"ModelConfig.rope_scaling_type={kind!r}: supported are None, "
                            "'linear' and 'llama3'")


def rope_tables(cfg: ModelConfig, positions_bt):
  """(cos, sin) of shape [B, T, rotary_dim // 2], float32."""
  freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x_btnh, cos_btr, sin_btr, rotary_dim: int):
  """HF `rotate_half` layout on the first `rotary_dim` channels; the rest pass through."""
  half = rotary_dim // 2
  cos = cos_btr[:, :, None, :].astype(x_btnh.dtype)
  sin = sin_btr[:, :, None, :].astype(x_btnh.dtype)
  x1 = x_btnh[..., :half]
  x2 = x_btnh[..., half:rotary_dim]
  rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  if rotary_dim < x_btnh.shape[-1]:
    rotated.append(x_btnh[..., rotary_dim:])
  return jnp.concatenate(rotated, axis=-1)


class Attention(nnx.Module):
  """Multi-head / grouped-query causal self-attention with an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = Dense((d,), (n, h), ("embed",), ("heads", "head_dim"), use_bias=cfg.qkv_bias, rngs=rngs)
    self.k = Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=cfg.qkv_bias,
                   rngs=rngs)
    self.v = Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=cfg.qkv_bias,
                   rngs=rngs)
    self.o = Dense((n, h), (d,), ("heads", "head_dim"), ("embed",), use_bias=cfg.out_bias,
                   rngs=rngs)

  def __call__(self, x_btd, rope, mask_bts, cache=None, cache_index=None, probs_key=None):
    cfg = self.cfg
    dtype = x_btd.dtype
    q_btnh = self.q(x_btd, dtype)
    k_btkh = self.k(x_btd, dtype)
    v_btkh = self.v(x_btd, dtype)
    if rope is not None:
      cos, sin = rope
      q_btnh = apply_rope(q_btnh, cos, sin, cfg.rotary_dim)
      k_btkh = apply_rope(k_btkh, cos, sin, cfg.rotary_dim)
    b, t, n, h = q_btnh.shape
    kh = cfg.num_kv_heads
    q_btkgh = q_btnh.reshape(b, t, kh, n // kh, h) * jnp.asarray(1.0 / math.sqrt(h), dtype)
    new_cache = None
    if cache is not None:
      # The cache is [B, K, S, H]: S next to H, so the per-step attention reads each head's
      # keys as one contiguous [S, H] matrix. With [B, S, K, H] XLA:CPU transposed the whole
      # cache every decode step (about a third of a GPT-2-small step, docs/benchmarks.md).
      # Only the T new rows are transposed here.
      write = lambda c, x: jax.lax.dynamic_update_slice(  # noqa: E731
          c, x.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, cache_index, 0))
      k_bksh, v_bksh = write(cache["k"], k_btkh), write(cache["v"], v_btkh)
      new_cache = {"k": k_bksh, "v": v_bksh}
      k_bksh, v_bksh = k_bksh.astype(dtype), v_bksh.astype(dtype)
      logits_bkgts = jnp.einsum("BTKGH,BKSH->BKGTS", q_btkgh, k_bksh,
                                preferred_element_type=jnp.float32)
    else:
      k_bskh, v_bskh = k_btkh, v_btkh
      logits_bkgts = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k_bskh,
                                preferred_element_type=jnp.float32)
    logits_bkgts = jnp.where(mask_bts[:, None, None, :, :], logits_bkgts, MASK_VALUE)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(dtype)
    probs_bkgts = dropout(probs_bkgts, cfg.attention_dropout, probs_key)
    if cache is not None:
      out_btkgh = jnp.einsum("BKGTS,BKSH->BTKGH", probs_bkgts, v_bksh)
    else:
      out_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", probs_bkgts, v_bskh)
    return self.o(out_btkgh.reshape(b, t, n, h), dtype), new_cache


class MLP(nnx.Module):
  """Gated (gate * act -> down, Llama) or plain (up -> act -> down, GPT-2 / NeoX) MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.gated_mlp:
      self.gate = Dense((d,), (f,), ("embed",), ("mlp",), use_bias=cfg.mlp_bias, rngs=rngs)
    else:
      self.gate = None
    self.up = Dense((d,), (f,), ("embed",), ("mlp",), use_bias=cfg.mlp_bias, rngs=rngs)
    self.down = Dense((f,), (d,), ("mlp",), ("embed",), use_bias=cfg.mlp_bias, rngs=rngs)

  def _act(self, x):
    act = self.cfg.activation
    if act == "silu":
      return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(act == "gelu_new"))

  def __call__(self, x_btd):
    dtype = x_btd.dtype
    if self.gate is not None:
      h_btf = self._act(self.gate(x_btd, dtype)) * self.up(x_btd, dtype)
    else:
      h_btf = self._act(self.up(x_btd, dtype))
    return self.down(h_btf, dtype)


class Block(nnx.Module):
  """Pre-norm decoder block; sequential or parallel (GPT-NeoX) residual."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.parallel = cfg.parallel_residual
    self.resid_dropout = cfg.dropout
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_btd, rope, mask_bts, cache=None, cache_index=None, dropout_keys=None):
    """`dropout_keys`: None (no dropout) or one key per BLOCK_DROPOUT_SITES entry."""
    probs_key, attn_key, mlp_key = dropout_keys if dropout_keys is not None else (None,) * 3
    attn_btd, new_cache = self.attn(self.attn_norm(x_btd), rope, mask_bts, cache, cache_index,
                                    probs_key)
    attn_btd = dropout(attn_btd, self.resid_dropout, attn_key)
    if self.parallel:
      mlp_btd = dropout(self.mlp(self.mlp_norm(x_btd)), self.resid_dropout, mlp_key)
      return x_btd + attn_btd + mlp_btd, new_cache
    x_btd = x_btd + attn_btd
    return x_btd + dropout(self.mlp(self.mlp_norm(x_btd)), self.resid_dropout, mlp_key), new_cache


def attention_mask(cfg: ModelConfig, q_slots_t, k_slots_s, key_ok_bs):
  """Boolean [B, T, S]: causal over slots, key is real, and inside the sliding window.

  Slots are indices in the (padded) sequence / cache, as in transformers, so a sliding
  window counts pad slots too.
  """
  allowed_ts = k_slots_s[None, :] <= q_slots_t[:, None]
  if cfg.sliding_window is not None:
    allowed_ts &= k_slots_s[None, :] > q_slots_t[:, None] - cfg.sliding_window
  return allowed_ts[None] & key_ok_bs.astype(bool)[:, None, :]


class Backbone(nnx.Module):
  """Embeddings -> blocks -> final norm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, "vocab", rngs=rngs)
    if cfg.position_type == "learned":
      self.pos_embed = Embed(cfg.max_position_embeddings, cfg.hidden_size, None, rngs=rngs)
    else:
      self.pos_embed = None
    for i in range(cfg.num_layers):
      setattr(self, f"layer_{i}", Block(cfg, rngs=rngs))
    self.final_norm = Norm(cfg)

  def __call__(self, ids_bt, positions_bt, mask_bts, cache=None, cache_index=None,
               dropout_rng=None):
    """Returns (hidden [B,T,D] in cfg.dtype after the final norm, new cache or None).

    `dropout_rng`: a PRNG key turns on the config's dropout (training steps); None (and
    always with a cache) is the deterministic forward pass.
    """
    cfg = self.cfg
    if dropout_rng is not None and cache is not None:
      raise ValueError("Backbone: dropout is for training forward passes, not KV-cache decoding")
    if cfg.dropout == 0 and cfg.attention_dropout == 0:
      dropout_rng = None
    dtype = jnp.dtype(cfg.dtype)
    mesh = trace_mesh(ids_bt, self.embed.embedding[...])
    x_btd = self.embed(ids_bt, dtype)
    rope = None
    if self.pos_embed is not None:
      x_btd = x_btd + self.pos_embed(positions_bt, dtype)
    else:
      rope = rope_tables(cfg, positions_bt)
    x_btd = constrain_batch(x_btd, mesh)   # before dropout: its mask is then drawn split too
    if dropout_rng is not None:
      x_btd = dropout(x_btd, cfg.dropout, dropout_key(dropout_rng, 0, "embedding"))
    new_cache = {} if cache is not None else None
    for i in range(cfg.num_layers):
      name = f"layer_{i}"
      block = getattr(self, name)
      layer_cache = cache[name] if cache is not None else None
      keys = None
      if dropout_rng is not None:
        keys = tuple(dropout_key(dropout_rng, i, site) for site in BLOCK_DROPOUT_SITES)
      if cfg.remat:
        fn = nnx.remat(lambda blk, x, r, m, c, ci, k: blk(x, r, m, c, ci, k))
        x_btd, layer_new = fn(block, x_btd, rope, mask_bts, layer_cache, cache_index, keys)
      else:
        x_btd, layer_new = block(x_btd, rope, mask_bts, layer_cache, cache_index, keys)
      x_btd = constrain_batch(x_btd, mesh)
      if cache is not None:
        new_cache[name] = layer_new
    return self.final_norm(x_btd), new_cache


class Model(nnx.Module):
  """Backbone plus an LM head ("causal") or a scalar head ("scalar": reward / value)."""

  def __init__(self, cfg: ModelConfig, kind: str = "causal", *, rngs: nnx.Rngs):
    if kind not in ("causal", "scalar"):
      raise ValueError(f"model kind={kind!r}: expected 'causal' or 'scalar'")
    self.cfg = cfg
    self.kind = kind
    self.backbone = Backbone(cfg, rngs=rngs)
    if kind == "causal" and not cfg.tie_word_embeddings:
      self.lm_head = Dense((cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",),
                           use_bias=False, rngs=rngs)
    if kind == "scalar":
      self.head = Dense((cfg.hidden_size,), (1,), ("embed",), (None,), use_bias=True, rngs=rngs)

  def unembed(self, h_btd):
    """Float32 logits [B,T,V] from final hidden states."""
    dtype = h_btd.dtype
    if self.cfg.tie_word_embeddings:
      w_dv = self.backbone.embed.embedding[...].T
    else:
      w_dv = self.lm_head.kernel[...]
    return jnp.einsum("BTD,DV->BTV", h_btd, w_dv.astype(dtype),
                      preferred_element_type=jnp.float32)

  def score_head(self, h_xd):
    """Float32 scalar per row of [..., D]."""
    w = self.head.kernel[...][:, 0].astype(jnp.float32)
    return h_xd.astype(jnp.float32) @ w + self.head.bias[...][0]
