"""Dropout in the training steps: SFT / RM steps draw masks from the state's rng and step
(so a resumed run repeats them), and nothing else ever applies dropout."""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import models, objectives, sharding
from rlhf_jax.trainers import model_init, rm, sft
from rlhf_jax.trainers import state as state_lib

CFG = models.get_preset("tiny").replace(vocab_size=64, num_layers=2)
RULES = state_lib.parse_rules("")


def _mesh():
  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _sft_batch(rng, b=8, t=12):
  ids = rng.integers(3, 64, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  return dict(input_ids=ids, attention_mask=mask, loss_mask=mask.copy())


def _losses(cfg, make_config, trainer, batch, kind, grad_accum=2):
  """The step's loss from a fresh state, again from a fresh state, and one step later."""
  c = make_config()
  c.train.batch_size, c.train.grad_accum = len(batch["input_ids"]), grad_accum
  params = jax.device_get(models.init(CFG, jax.random.PRNGKey(0), kind=kind))

  def loss(step_offset):   # a fresh model each time: the step donates its state
    parts = trainer.build(c, _mesh(), model_init.place(_mesh(), RULES, cfg, kind, params), 10)
    state = parts.init_state()
    state["step"] = state["step"] + step_offset
    return float(trainer.step(parts, state, batch)[1]["loss"])

  return loss(0), loss(0), loss(1)


def test_sft_step_dropout_is_seeded_by_rng_and_step():
  batch = _sft_batch(np.random.default_rng(0))
  plain = _losses(CFG, config_lib.sft_config, sft, batch, "causal")
  dropped = _losses(CFG.replace(dropout=0.3, attention_dropout=0.1), config_lib.sft_config,
                    sft, batch, "causal")
  assert plain[0] == plain[1] == plain[2]          # no dropout: the step does not matter
  assert dropped[0] == dropped[1]                  # same rng and step: the same masks
  assert dropped[0] != dropped[2]                  # the next step draws new masks
  assert abs(dropped[0] - plain[0]) > 1e-4         # and the masks are really applied


def test_rm_step_applies_dropout_too():
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 64, (4, 2, 10)).astype(np.int32)
  batch = dict(input_ids=ids, attention_mask=np.ones_like(ids),
               last_index=np.full((4, 2), 9, np.int32),
               ranks=np.tile(np.arange(2, dtype=np.int32), (4, 1)), valid=np.ones((4, 2), bool))
  plain = _losses(CFG, config_lib.rm_config, rm, batch, "scalar", grad_accum=1)
  dropped = _losses(CFG.replace(dropout=0.3), config_lib.rm_config, rm, batch, "scalar",
                    grad_accum=1)
  assert dropped[0] == dropped[1] and dropped[0] != dropped[2]
  assert abs(dropped[0] - plain[0]) > 1e-4


def test_scoring_and_rollout_objectives_never_drop():
  cfg = CFG.replace(dropout=0.5, attention_dropout=0.5)
  params = models.init(CFG, jax.random.PRNGKey(0), kind="causal")
  ids = np.random.default_rng(2).integers(3, 64, (4, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  np.testing.assert_array_equal(
      np.asarray(objectives.response_logprobs(cfg, params, ids, mask, 4, 1.0)),
      np.asarray(objectives.response_logprobs(CFG, params, ids, mask, 4, 1.0)))
  assert objectives.dropout_keys(CFG, jax.random.PRNGKey(0), 0, 2) is None
