"""Decode-batch compaction (`sampling.generate(compact=k)`, `ppo.rollout_compaction`; issue 18
item 2): once no more than half of a rollout's rows are live, the live rows move into a batch
half as wide, so finished rows stop costing decode compute.

The references are independent of the compacting loop:
- the plain decode loop (`compact=0`), which decodes every row to the end: compaction must
  give the same tokens and masks (the sampling noise of a row is drawn for the whole batch
  and gathered, so no draw changes) and log-probs within float32 rounding (a narrower
  matmul may round a logit differently: 1e-5, measured ~5e-7);
- the compute it spends, from a host simulation of the schedule written from the spec
  (`expected_row_steps`: the loop at width w_i runs while more than w_{i+1} rows are live):
  the loop's own count must equal it, and be below the plain loop's B x steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import generation, models, sampling, sharding
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import ppo
from test_sampling import FAMILY_CFGS   # the two tiny families sampling is tested on

PAD = 0
B, P, N = 12, 7, 24
LOGP_TOL = 1e-5

# 12 of 96 ids stop a row: with a near-uniform distribution each step ends a live row with
# probability ~1/8, so lengths spread over [1, N] and a few rows run to N.
STOPS = list(range(84, 96))
_MODELS = {}


def _model(family="llama"):
  if family not in _MODELS:
    cfg = models.ModelConfig(**FAMILY_CFGS[family]).replace(vocab_size=96)
    params = models.init(cfg, jax.random.key(0), kind="causal")
    _MODELS[family] = cfg, params
  return _MODELS[family]


def _prompts(batch=B, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, P + 1, batch)
  lengths[0] = P
  prompts = [list(rng.integers(3, 84, n)) for n in lengths]
  ids, mask = sampling.pad_prompts(prompts, PAD, length=P)
  return jnp.asarray(ids), jnp.asarray(mask)


def expected_row_steps(lengths: np.ndarray, n: int, widths: list[int]) -> int:
  """Row-steps the compacting loop computes for rows of these response lengths (the spec):
  at width widths[i] it decodes while step < n and more than widths[i + 1] rows are live
  (a row of length L is live before step L); the last width runs while any row is."""
  step, total = 0, 0
  for i, width in enumerate(widths):
    nxt = widths[i + 1] if i + 1 < len(widths) else 0
    while step < n and int(np.sum(lengths > step)) > nxt:
      total += width
      step += 1
  return total


def _run(cfg, params, ids, mask, compact, key=1, n=N, **kwargs):
  out, row_steps = sampling.generate_with_row_steps(
      cfg, params, ids, mask, jax.random.key(key), n, compact=compact, **kwargs)
  return jax.tree.map(np.asarray, out), int(row_steps)


SAMPLING = {
    "t1": dict(),
    "t07_topk": dict(temperature=0.7, top_k=30),
    "top_p": dict(top_p=0.9),
    "greedy": dict(greedy=True),
}


@pytest.mark.parametrize("mode", sorted(SAMPLING))
@pytest.mark.parametrize("compact", [1, 3])
def test_compaction_changes_no_draw_and_saves_the_finished_rows(mode, compact):
  cfg, params = _model()
  ids, mask = _prompts()
  kwargs = dict(SAMPLING[mode], eos_id=STOPS, pad_id=PAD)
  plain, plain_steps = _run(cfg, params, ids, mask, 0, **kwargs)
  got, row_steps = _run(cfg, params, ids, mask, compact, **kwargs)
  np.testing.assert_array_equal(got.tokens, plain.tokens)
  np.testing.assert_array_equal(got.mask, plain.mask)
  np.testing.assert_allclose(got.logprobs, plain.logprobs, atol=LOGP_TOL, rtol=0)
  lengths = plain.mask.sum(axis=1)
  steps = int(lengths.max())
  assert plain_steps == B * steps
  widths = [B, 6, 3, 2][:compact + 1]
  assert list(sampling.decode_widths(B, compact)) == widths
  assert row_steps == expected_row_steps(lengths, N, widths)
  assert lengths.sum() <= row_steps < plain_steps      # the rows' spread makes it narrow


def test_compaction_on_the_gpt2_family_and_another_key():
  cfg, params = _model("gpt2")
  ids, mask = _prompts(seed=3)
  plain, _ = _run(cfg, params, ids, mask, 0, key=7, eos_id=STOPS)
  got, row_steps = _run(cfg, params, ids, mask, 2, key=7, eos_id=STOPS)
  np.testing.assert_array_equal(got.tokens, plain.tokens)
  np.testing.assert_allclose(got.logprobs, plain.logprobs, atol=LOGP_TOL, rtol=0)
  assert row_steps == expected_row_steps(plain.mask.sum(1), N, [B, 6, 3])


def test_rows_that_all_run_to_the_end_never_narrow():
  """No stop ids: compaction is off (every row runs N steps); one stop id nobody samples
  before N: the loop stays at full width."""
  cfg, params = _model()
  ids, mask = _prompts()
  plain, _ = _run(cfg, params, ids, mask, 0)
  got, row_steps = _run(cfg, params, ids, mask, 3)
  np.testing.assert_array_equal(got.tokens, plain.tokens)
  assert row_steps == B * N
  rare = [int(t) for t in range(3, 96) if not np.any(plain.tokens == t)][:1]
  got, row_steps = _run(cfg, params, ids, mask, 3, eos_id=rare)
  np.testing.assert_array_equal(got.tokens, plain.tokens)
  assert row_steps == B * N


def test_odd_batch_and_one_row():
  cfg, params = _model()
  for batch in (5, 1):
    ids, mask = _prompts(batch, seed=batch)
    plain, _ = _run(cfg, params, ids, mask, 0, eos_id=STOPS)
    got, row_steps = _run(cfg, params, ids, mask, 4, eos_id=STOPS)
    np.testing.assert_array_equal(got.tokens, plain.tokens)
    widths = list(sampling.decode_widths(batch, 4))
    assert widths == ([5, 3, 2, 1] if batch == 5 else [1])
    assert row_steps == expected_row_steps(plain.mask.sum(1), N, widths)


def test_compaction_under_an_outer_jit():
  cfg, params = _model()
  ids, mask = _prompts()

  @jax.jit
  def run(params, ids, mask, key, temperature):
    return sampling.generate(cfg, params, ids, mask, key, N, temperature=temperature,
                             eos_id=STOPS, compact=2)
  got = run(params, ids, mask, jax.random.key(1), jnp.float32(0.8))
  plain, _ = _run(cfg, params, ids, mask, 0, temperature=0.8, eos_id=STOPS)
  np.testing.assert_array_equal(np.asarray(got.tokens), plain.tokens)


def test_compaction_with_the_batch_split_over_8_devices():
  """Rows sharded over data=8: the narrowed batches (16 -> 8 -> 4) are gathered across
  devices; the tokens are the one-device plain loop's."""
  cfg, params = _model()
  ids, mask = _prompts(16, seed=5)
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  placed = sharding.host_to_global(mesh, dict(ids=np.asarray(ids), mask=np.asarray(mask)))
  out, row_steps = sampling.generate_with_row_steps(
      cfg, params, placed["ids"], placed["mask"], jax.random.key(2), N, eos_id=STOPS,
      compact=2)
  plain, _ = _run(cfg, params, ids, mask, 0, key=2, eos_id=STOPS)
  np.testing.assert_array_equal(np.asarray(out.tokens), plain.tokens)
  # Held split like the rows they came from: a multi-process caller reads its own rows
  # through `addressable_shards` (the reward function's scoring does).
  for leaf in out:
    assert leaf.sharding.is_equivalent_to(placed["ids"].sharding, 2), leaf.sharding
    assert {sh.data.shape for sh in leaf.addressable_shards} == {(2, N)}
  np.testing.assert_allclose(np.asarray(out.logprobs), plain.logprobs, atol=LOGP_TOL, rtol=0)
  assert int(row_steps) == expected_row_steps(plain.mask.sum(1), N, [16, 8, 4])


def test_bad_compact_values_name_the_field():
  cfg, params = _model()
  ids, mask = _prompts()
  with pytest.raises(ValueError, match="compact=-1"):
    sampling.generate(cfg, params, ids, mask, jax.random.key(0), N, eos_id=STOPS, compact=-1)
  c = config_lib.ppo_config()
  c.ppo.rollout_compaction = -1
  with pytest.raises(ConfigError, match="ppo.rollout_compaction"):
    config_lib.validate(c)


def _spy_on_generate(monkeypatch):
  seen = []
  real = sampling.generate

  def spy(*args, **kwargs):
    seen.append(kwargs.get("compact", 0))
    return real(*args, **kwargs)
  monkeypatch.setattr(sampling, "generate", spy)
  return seen


def test_ppo_rollouts_and_responses_compact(monkeypatch):
  """`ppo.rollout` (PPO and the GRPO family) passes `ppo.rollout_compaction`; evaluation's and
  `sample`'s `generation.generate_responses` compacts by default."""
  cfg, params = _model()
  ids, mask = _prompts()
  seen = _spy_on_generate(monkeypatch)
  c = config_lib.ppo_config()
  c.ppo.rollout_compaction = 3
  c.ppo.max_new_tokens = N
  parts = SimpleNamespace(
      config=c, response_buckets=(N,),
      models=SimpleNamespace(policy=SimpleNamespace(cfg=cfg), stop_ids=tuple(STOPS),
                             pad_id=PAD))
  out = ppo.rollout(parts, params, dict(input_ids=ids, attention_mask=mask),
                    jax.random.key(1))
  plain, _ = _run(cfg, params, ids, mask, 0, eos_id=STOPS)
  np.testing.assert_array_equal(np.asarray(out.tokens), plain.tokens)
  tokenizer = SimpleNamespace(eos_token_id=STOPS[0], pad_token_id=PAD,
                              decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
  generation.generate_responses(cfg, params, tokenizer, np.asarray(ids), np.asarray(mask),
                                jax.random.key(1), N, batch_size=B, stop_ids=STOPS)
  assert seen == [3, 2]
