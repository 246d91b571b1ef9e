"""`config.stage` -> the stage's `train(config, workdir)`."""

from __future__ import annotations

import importlib

from rlhf_jax.errors import ConfigError

_MODULES = {"pretrain": "sft", "sft": "sft", "rm": "rm", "ppo": "ppo"}


def train(config, workdir: str) -> dict:
  if config.stage not in _MODULES:
    raise ConfigError("stage", config.stage, "one of " + ", ".join(_MODULES))
  module = importlib.import_module(f"rlhf_jax.trainers.{_MODULES[config.stage]}")
  return module.train(config, workdir) or {}
