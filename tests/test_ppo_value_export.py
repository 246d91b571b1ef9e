"""PPO exports its value model beside the policy: `<workdir>/export/value_model`.

Oracle: transformers' `AutoModelForSequenceClassification` reads the export, and its score
at each sequence's last token, minus the exported normalisation's mean (where the head's
bias goes, as for a reward model), equals our value model's score of the trained state at
that token (1e-4); PPO's own reload (`ppo.value_from=<export>`) gives back the same values.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import helpers
from rlhf_jax import config as config_lib
from rlhf_jax import models, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import model_init, ppo
from rlhf_jax.trainers import state as state_lib

torch = pytest.importorskip("torch", reason="torch is the transformers reference")
transformers = pytest.importorskip("transformers")

CFG = models.get_preset("tiny").replace(vocab_size=16, num_layers=2, eos_token_id=1,
                                        pad_token_id=0)
EOS, PAD = 1, 0
TOL = 1e-4


def _value_params(seed):
  params = jax.device_get(models.init(CFG, jax.random.PRNGKey(seed), kind="scalar"))
  # A zero head would score every token alike (and hide an index or a bias mistake).
  params["head"]["kernel"] = np.asarray(jax.random.normal(
      jax.random.PRNGKey(seed + 1), params["head"]["kernel"].shape))
  params["head"]["bias"] = np.full_like(np.asarray(params["head"]["bias"]), 0.8)
  return params


def _batch():
  """Right-padded sequences (pad 0, as our loaders pad), the last ones ending at EOS."""
  rng = np.random.default_rng(0)
  lengths = [9, 5, 7, 3]
  ids = np.full((4, 10), PAD, np.int64)
  mask = np.zeros((4, 10), np.int64)
  for b, n in enumerate(lengths):
    ids[b, :n] = rng.integers(4, 14, n)
    ids[b, n - 1] = EOS if b % 2 else ids[b, n - 1]
    mask[b, :n] = 1
  return ids, mask, np.asarray(lengths) - 1


def test_exported_value_model_scores_like_ours_in_transformers(tmp_path):
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  rules = state_lib.parse_rules("")
  place = lambda kind, params: model_init.place(mesh, rules, CFG, kind, params)  # noqa: E731
  c = config_lib.ppo_config()
  c.train.batch_size, c.ppo.minibatches, c.ppo.ptx_coef = 4, 1, 0.0
  m = ppo.Models(policy=place("causal", jax.device_get(models.init(
      CFG, jax.random.PRNGKey(0), kind="causal"))), value=place("scalar", _value_params(3)),
      reward=None, normalization=dict(workdir_lib.NO_NORMALIZATION), eos_id=EOS, pad_id=PAD,
      stop_ids=(EOS,))
  parts = ppo.build(c, mesh, m, use_ptx=False)
  state = parts.init_state()
  # The trained value differs from where it started: export the state's, not the model's.
  state["value"] = jax.tree.map(lambda x: x * 1.1, state["value"])
  tok = helpers.word_tokenizer()
  out = ppo.export_models(parts, state, str(tmp_path), tok)
  export = out["value model"]
  assert export == os.path.join(str(tmp_path), "export", ppo.VALUE_MODEL_EXPORT)
  assert os.path.isfile(os.path.join(str(tmp_path), "export", "policy", "config.json"))
  norm = workdir_lib.read_rm_normalization(export)
  assert norm["gain"] is False and abs(norm["mean"] + 0.88) < 1e-6   # −(0.8 × 1.1)

  ids, mask, last = _batch()
  ours = np.asarray(models.scores(CFG, state["value"], ids, mask, last.astype(np.int32)),
                    np.float64)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      export, attn_implementation="eager").eval()
  pad = json.load(open(os.path.join(export, "config.json")))["pad_token_id"]
  assert pad != EOS   # transformers reads each row's last token that is not pad
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.where(mask > 0, ids, pad)),
                attention_mask=torch.tensor(mask)).logits[:, 0].numpy().astype(np.float64)
  np.testing.assert_allclose(theirs - norm["mean"], ours, atol=TOL)
  # The index and the bias both matter: neither the token before nor the raw HF score fits.
  before = np.asarray(models.scores(CFG, state["value"], ids, mask, (last - 1).astype(np.int32)))
  assert np.abs(before - ours).min() > 10 * TOL
  assert np.abs(theirs - ours).min() > 10 * TOL

  # PPO reads it back in the same units (`ppo.value_from=<export>`).
  cfg2, params2 = models.load_hf(export)
  value2 = ppo.in_reward_units(place("scalar", params2), norm)
  again = np.asarray(models.scores(cfg2, value2.params, ids, mask, last.astype(np.int32)))
  np.testing.assert_allclose(again, ours, atol=TOL)
