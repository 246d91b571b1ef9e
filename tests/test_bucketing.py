"""Length bucketing: which length a batch is cut to, and that the cut changes no result.

The bucket choice is checked against a brute-force oracle (every column of the global batch
scanned in Python); the "changes no result" checks run the trainers' own step / experience
functions on a batch and on the same batch cut to its bucket.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

from rlhf_jax import config as config_lib
from rlhf_jax import data, models, optim, sampling
from rlhf_jax.trainers import batching
from rlhf_jax.trainers import ppo_experience
from rlhf_jax.trainers import rm as rm_lib
from rlhf_jax.trainers import sft as sft_lib
from rlhf_jax.trainers import state as state_lib


def oracle_buckets(max_len, smallest):
  if smallest <= 0 or smallest >= max_len:
    return [max_len]
  out = [smallest * 2 ** i for i in range(64) if smallest * 2 ** i < max_len]
  return out + [max_len]


def oracle_needed(mask, side):
  """Columns from the first (left) / to the last (right) column with any real token."""
  t = mask.shape[-1]
  flat = mask.reshape(-1, t)
  used = [c for c in range(t) if any(flat[r, c] for r in range(flat.shape[0]))]
  if not used:
    return 1
  return t - used[0] if side == "left" else used[-1] + 1


@settings(max_examples=200, deadline=None)
@given(max_len=st.integers(1, 700), smallest=st.integers(0, 300), length=st.integers(1, 700))
def test_buckets_match_the_oracle(max_len, smallest, length):
  buckets = data.length_buckets(max_len, smallest)
  assert list(buckets) == oracle_buckets(max_len, smallest)
  if length <= max_len:
    assert data.bucket_for(length, buckets) == min(b for b in buckets if b >= length)
  else:
    with pytest.raises(ValueError, match="exceeds"):
      data.bucket_for(length, buckets)


def padded_arrays(rng, n, t, side, extra_dims=()):
  lengths = rng.integers(0, t + 1, size=(n,) + extra_dims)
  cols = np.arange(t)
  if side == "right":
    mask = (cols < lengths[..., None]).astype(np.int32)
  else:
    mask = (cols >= t - lengths[..., None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(1, 50, size=mask.shape), 0).astype(np.int32)
  return dict(input_ids=ids, attention_mask=mask, row=np.arange(n))


@pytest.mark.parametrize("side,extra_dims", [("right", ()), ("left", ()), ("right", (3,))])
def test_iterator_cuts_each_global_batch_to_its_bucket(side, extra_dims):
  rng = np.random.default_rng(0)
  t, n, b = 40, 60, 8
  arrays = padded_arrays(rng, n, t, side, extra_dims)
  # all but every 8th row short (3 tokens), so that batches fall into several buckets
  short = np.arange(n) % 8 != 0
  arrays["attention_mask"][short] = 0
  if side == "right":
    arrays["attention_mask"][short, ..., :3] = 1
  else:
    arrays["attention_mask"][short, ..., -3:] = 1
  arrays["input_ids"] = np.where(arrays["attention_mask"] > 0, arrays["input_ids"] + 1, 0)
  bucketing = data.Bucketing(("input_ids", "attention_mask"), 5, side)
  one = data.BatchIterator(arrays, b, seed=0, bucketing=bucketing)
  two = [data.BatchIterator(arrays, b, seed=0, process_index=p, process_count=2,
                            bucketing=bucketing) for p in range(2)]
  seen = set()
  for _ in range(20):
    got = next(one)
    rows = got["row"]
    full_mask = arrays["attention_mask"][rows]
    length = got["input_ids"].shape[-1]
    seen.add(length)
    need = oracle_needed(full_mask, side)
    assert length == min(x for x in oracle_buckets(t, 5) if x >= need)
    kept = slice(None, length) if side == "right" else slice(t - length, None)
    np.testing.assert_array_equal(got["attention_mask"], full_mask[..., kept])
    np.testing.assert_array_equal(got["input_ids"], arrays["input_ids"][rows][..., kept])
    dropped = np.delete(full_mask, np.arange(t)[kept], axis=-1)
    assert dropped.sum() == 0
    parts = [next(h) for h in two]
    for k in got:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), got[k])
  assert len(seen) >= 2, seen


def test_bucketing_bad_keys_are_named():
  arrays = dict(input_ids=np.zeros((8, 6), np.int32), attention_mask=np.ones((8, 5), np.int32))
  with pytest.raises(data.DataError, match="last"):
    data.BatchIterator(arrays, 4, 0, bucketing=data.Bucketing(
        ("input_ids", "attention_mask"), 2))
  with pytest.raises(data.DataError, match="loss_mask"):
    data.BatchIterator(arrays, 4, 0, bucketing=data.Bucketing(
        ("loss_mask", "attention_mask"), 2))
  with pytest.raises(ValueError, match="side"):
    data.Bucketing(("attention_mask",), 2, "middle")


def test_config_field_is_validated():
  from rlhf_jax.errors import ConfigError
  c = config_lib.sft_config()
  c.data.bucket_min_len = -1      # (a float or string is refused by ml_collections' typing)
  with pytest.raises(ConfigError, match="data.bucket_min_len"):
    config_lib.validate(c)


# ---------------------------------------------------------------- the cut changes nothing

CFG = models.get_preset("tiny").replace(vocab_size=64)


def _step_once(make_step, kind, batch):
  params = models.init(CFG, jax.random.key(0), kind=kind)
  tx = optim.make_optimizer(config_lib.sft_config().optim, 10)
  state = dict(state_lib.scalar_state(0), params=params, opt_state=tx.init(params))
  new, metrics = jax.jit(make_step(CFG, tx, 2))(state, batch)
  return new["params"], metrics


def _assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sft_step_on_a_cut_batch_equals_the_full_batch():
  rng = np.random.default_rng(1)
  t = 32
  arr = padded_arrays(rng, 8, t, "right")
  arr["attention_mask"][:, 13:] = 0          # every row ends by column 13 -> bucket 16
  arr["attention_mask"][:, 0] = 1
  arr["input_ids"] = np.where(arr["attention_mask"] > 0, arr["input_ids"] + 1, 0)
  loss_mask = arr["attention_mask"].copy()
  loss_mask[:, :2] = 0
  full = dict(input_ids=arr["input_ids"], attention_mask=arr["attention_mask"],
              loss_mask=loss_mask)
  bucketing = data.Bucketing(("input_ids", "attention_mask", "loss_mask"), 8)
  length = bucketing.length(full["attention_mask"])
  assert length == 16
  cut = bucketing.cut(full, length)
  p_full, m_full = _step_once(sft_lib.make_train_step, "causal", full)
  p_cut, m_cut = _step_once(sft_lib.make_train_step, "causal", cut)
  np.testing.assert_allclose(float(m_cut["loss"]), float(m_full["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m_cut["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
  assert int(m_cut["tokens"]) == int(m_full["tokens"])
  _assert_trees_close(p_cut, p_full, rtol=1e-5, atol=1e-7)


def test_rm_step_on_a_cut_batch_equals_the_full_batch():
  rng = np.random.default_rng(2)
  arr = padded_arrays(rng, 8, 24, "right", extra_dims=(2,))
  arr["attention_mask"][..., 9:] = 0
  arr["attention_mask"][..., 0] = 1
  mask = arr["attention_mask"]
  full = dict(input_ids=np.where(mask > 0, arr["input_ids"] + 1, 0), attention_mask=mask,
              last_index=(mask.sum(-1) - 1).astype(np.int32),
              ranks=np.tile(np.arange(2, dtype=np.int32), (8, 1)), valid=np.ones((8, 2), bool))
  bucketing = data.Bucketing(("input_ids", "attention_mask"), 4)
  cut = bucketing.cut(full, bucketing.length(mask))
  assert cut["input_ids"].shape == (8, 2, 16)     # buckets 4, 8, 16, 24; rows end by 9
  p_full, m_full = _step_once(rm_lib.make_train_step, "scalar", full)
  p_cut, m_cut = _step_once(rm_lib.make_train_step, "scalar", cut)
  np.testing.assert_allclose(float(m_cut["loss"]), float(m_full["loss"]), rtol=1e-6)
  _assert_trees_close(p_cut, p_full, rtol=1e-5, atol=1e-7)


def test_ppo_experience_on_cut_prompts_and_responses_equals_the_full_one():
  """Left-cut prompts + responses cut by `batching.cut_responses`: same experience."""
  conf = config_lib.ppo_config()
  conf.data.bucket_min_len = 4
  p = conf.ppo
  rng = np.random.default_rng(3)
  b, prompt_len, n = 8, 12, 16
  prompt_lengths = rng.integers(1, 7, size=b)          # every prompt fits 8 of 12 columns
  mask = (np.arange(prompt_len) >= prompt_len - prompt_lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(2, 60, size=(b, prompt_len)), 0).astype(np.int32)
  policy = models.init(CFG, jax.random.key(0), kind="causal")
  ref = models.init(CFG, jax.random.key(1), kind="causal")
  value = models.causal_to_scalar(CFG, models.init(CFG, jax.random.key(2)), jax.random.key(3))
  reward = models.causal_to_scalar(CFG, models.init(CFG, jax.random.key(4)), jax.random.key(5))
  eos = 1
  # Given (not sampled) responses that end with EOS after 1..7 tokens: the longest fits
  # the response bucket 8 of (4, 8, 16).
  resp_len = rng.integers(1, 8, size=b)
  tokens = rng.integers(2, 60, size=(b, n)).astype(np.int32)
  tokens[np.arange(b), resp_len - 1] = eos
  rmask = (np.arange(n) < resp_len[:, None]).astype(np.int32)
  tokens = np.where(rmask > 0, tokens, 0)
  out = sampling.GenerateOutput(jnp.asarray(tokens), jnp.zeros((b, n), jnp.float32),
                                jnp.asarray(rmask))
  cut_out = batching.cut_responses(out, batching.response_buckets(conf, n))
  assert cut_out.tokens.shape == (b, 8)
  pb = batching.length_bucketing(conf, ("input_ids", "attention_mask"), side="left")
  cut_prompts = pb.cut(dict(input_ids=ids, attention_mask=mask), pb.length(mask))
  assert cut_prompts["input_ids"].shape == (b, 8)
  norm = dict(mean=0.1, std=1.0, gain=False)

  def experience(prompts, o):
    fn = jax.jit(ppo_experience.make_experience_fn(CFG, CFG, CFG, p, norm, eos,
                                                   prompts["input_ids"].shape[1]))
    return fn(policy, ref, value, reward, 0.05, prompts["input_ids"],
              prompts["attention_mask"], o.tokens, o.mask)

  exp_full, m_full = experience(dict(input_ids=ids, attention_mask=mask), out)
  exp_cut, m_cut = experience(cut_prompts, cut_out)
  valid = rmask[:, :8] > 0
  for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
    np.testing.assert_allclose(np.asarray(getattr(exp_cut, name))[valid],
                               np.asarray(getattr(exp_full, name))[:, :8][valid],
                               rtol=1e-5, atol=1e-5, err_msg=name)
    if name in ("values", "advantages", "returns"):   # zeroed past each response
      assert not np.asarray(getattr(exp_full, name))[:, 8:].any(), name
  for k in m_full:
    np.testing.assert_allclose(float(m_cut[k]), float(m_full[k]), rtol=1e-5, atol=1e-6,
                               err_msg=k)
