"""The issue-18 additions to the benchmark harness (bench/): long rollouts' EOS set-up and
waste accounting, the Tunix peer's FLOP-matched shape, and the agreement of the sampler's
log-probs with the scoring pass's (the precondition for reusing them as PPO's old log-probs).
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import long_rollouts  # noqa: E402
import tunix_peer  # noqa: E402


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_hazard_x_solves_the_truncated_geometric_mean(frac):
  x = long_rollouts.hazard_x(frac)
  assert (1 - math.exp(-x)) / x == pytest.approx(frac, rel=1e-9)
  with pytest.raises(ValueError, match="eos-mean"):
    long_rollouts.hazard_x(1.0)


def test_stop_ids_give_the_target_mean_length():
  """Monte Carlo of the model the harness assumes (each step stops a live row with
  probability K/V, uniform sampling): mean truncated length ≈ eos_mean × N."""
  v, n, frac = 50257, 256, 0.5
  ids = long_rollouts.stop_ids(v, n, frac)
  assert ids == list(range(v - len(ids), v)) and 0 not in ids
  h = len(ids) / v
  rs = np.random.RandomState(0)
  lengths = np.minimum(rs.geometric(h, size=200_000), n)
  assert lengths.mean() / n == pytest.approx(frac, abs=0.01)
  # Clipped to [1, V - 2]: a tiny vocabulary never gets every id as a stop id.
  assert long_rollouts.stop_ids(4, 1, 0.01) == [2, 3]
  assert long_rollouts.stop_ids(256, 10_000, 0.5) == [255]


def test_waste_counts_finished_row_steps():
  mask = np.zeros((3, 8), np.int32)
  for row, length in enumerate([2, 5, 3]):
    mask[row, :length] = 1
  w = long_rollouts.waste(mask)
  # The loop ran 5 steps (the longest row) for 3 rows: 15 row-steps, 10 of them useful.
  assert (w["steps"], w["useful"], w["row_steps"]) == (5, 10, 15)
  assert w["finished_share"] == pytest.approx(5 / 15)
  assert (w["min_len"], w["max_len"], w["mean_len"]) == (2, 5, pytest.approx(10 / 3))


def test_tunix_gpt2_shape_has_gpt2_small_flops():
  """The Llama-style peer model does GPT-2 small's matmul FLOPs per token."""
  layers, d, heads, kv, hd, f, vocab = tunix_peer.SHAPES["gpt2"]
  gpt2 = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257   # attn q,k,v,o + MLP + head
  llama = layers * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f) + d * vocab
  assert llama == gpt2
  tok = tunix_peer.IdTokenizer(vocab)
  assert tok.encode(tok.decode([5, 17, 50255])) == [5, 17, 50255]
  assert tok.encode(np.array(["5 17"])) == [5, 17]   # how Tunix passes it at 1 minibatch
  assert (tok.pad_id(), tok.eos_id(), tok.bos_id()) == (0, vocab - 1, None)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_the_scoring_pass_in_float32(temperature):
  """Item 4: in float32 the sampler's log-probs equal objectives.response_logprobs (the
  experience's "old" log-probs) to float tolerance; the harness reports the measured gap."""
  from rlhf_jax import models, objectives, sampling
  cfg = models.get_preset("tiny", dtype="float32")
  params = models.init(cfg, jax.random.key(0), kind="causal")
  b, p, n = 4, 6, 8
  rs = np.random.RandomState(0)
  ids = jnp.asarray(rs.randint(1, cfg.vocab_size - 1, size=(b, p)), jnp.int32)
  mask = np.ones((b, p), np.int32)
  mask[0, :2] = 0   # a left-padded row
  mask = jnp.asarray(mask)
  out = sampling.generate(cfg, params, ids, mask, jax.random.key(1), max_new_tokens=n,
                          temperature=temperature, eos_id=None, pad_id=0)
  full = jnp.concatenate([ids, out.tokens], axis=1)
  full_mask = jnp.concatenate([mask, out.mask], axis=1)
  ref = objectives.response_logprobs(cfg, params, full, full_mask, p, temperature)
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=1e-5, rtol=0)
  assert float(jnp.mean(ref)) < -1.0   # not trivially zero
