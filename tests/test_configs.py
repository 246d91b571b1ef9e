"""Every config file loads, validates, and rejects bad values naming the field."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest

from rlhf_jax import config as config_lib
from rlhf_jax.errors import ConfigError

import helpers

CONFIGS = sorted(glob.glob(os.path.join(helpers.REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_three_stage_configs():
  assert {os.path.basename(p) for p in CONFIGS} >= {"sft.py", "rm.py", "ppo.py"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_loads_and_validates(path, arg):
  c = _load(path).get_config(arg)
  config_lib.validate(c)
  assert c.stage in config_lib.STAGES
  assert "launch/train.py" in (_load(path).__doc__ or "")


@pytest.mark.parametrize("field,value,needle", [
    ("optim.lr", -1.0, "optim.lr"),
    ("optim.schedule", "exp", "optim.schedule"),
    ("train.grad_accum", 3, "train.grad_accum"),
    ("mesh.data", 0, "mesh.data"),
    ("model.dtype", "float16", "model.dtype"),
    ("ppo.top_p", 0.0, "ppo.top_p"),
    ("ppo.lam", 1.5, "ppo.lam"),
    ("ppo.kl_controller", "pid", "ppo.kl_controller"),
    ("ppo.minibatches", 5, "ppo.minibatches"),
    ("ppo.max_new_tokens", 1000, "ppo.max_new_tokens"),
])
def test_bad_values_name_the_field(field, value, needle):
  c = config_lib.ppo_config()
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    config_lib.validate(c)


def test_own_data_requires_a_dataset():
  c = config_lib.sft_config()
  c.task = ""
  with pytest.raises(ConfigError, match=r"data\.train\.path"):
    config_lib.validate(c)


def test_unknown_variant_is_an_error():
  with pytest.raises(ConfigError):
    config_lib.apply_variant(config_lib.sft_config(), "huge")
