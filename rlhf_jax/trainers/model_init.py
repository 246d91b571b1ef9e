"""A stage's starting point: its mesh, its tokenizer and each model's weights on the mesh.

`model.init_from` may be a local HF directory (config.json + safetensors) or a previous
stage's workdir (its `export/policy` or `export/reward_model`, `workdir.resolve_model_dir`);
empty means a random init of `model.preset`, sized to the tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from rlhf_jax import config as config_lib
from rlhf_jax import models, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.trainers import state as state_lib


@dataclasses.dataclass
class Model:
  """One model placed on the mesh."""
  cfg: Any            # models.ModelConfig
  params: Any         # pytree of global arrays
  shardings: Any      # NamedSharding tree, same structure as params
  source: str = ""    # where the weights came from (for the start-up log line)
  fresh_head: bool = False   # a scalar model made from a causal LM: its head is new


def make_mesh(config):
  """The device mesh of `config.mesh` (a bad shape is a ConfigError naming `mesh`)."""
  try:
    return sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ConfigError("mesh", dict(config.mesh), str(e)) from None


def load_tokenizer(config, model_dir: Optional[str]):
  """The tokenizer named by `config.tokenizer`, else the one saved with the model."""
  candidates = [config.tokenizer] if config.tokenizer else []
  if model_dir:
    candidates.append(model_dir)
  for path in candidates:
    path = os.path.expanduser(path)
    if workdir_lib.has_tokenizer(path):
      return workdir_lib.read_tokenizer(path)
  raise ConfigError("tokenizer", config.tokenizer,
                    "a tokenizer directory (none found next to model.init_from either)")


def check_vocab(tokenizer, cfg, what: str) -> None:
  if len(tokenizer) > cfg.vocab_size:
    raise UserError(
        f"tokenizer has {len(tokenizer)} tokens but the {what} has vocab_size="
        f"{cfg.vocab_size}: they do not belong together (set config.tokenizer or "
        "model.init_from to a matching pair)")


def place(mesh, rules, cfg, kind: str, host_params, source: str = "") -> Model:
  """Host (numpy) params -> a `Model` sharded over `mesh` by the rules table."""
  shardings = state_lib.model_shardings(mesh, cfg, kind, rules)
  return Model(cfg, state_lib.place(host_params, shardings), shardings, source)


def initial_model(config, mesh, rules, kind: str, init_from: str, seed_offset: int = 0,
                  tokenizer=None, field: str = "model.init_from") -> Model:
  """One model of a stage: loaded from `init_from`, or a random init of `model.preset`."""
  # The run's compute dtype, remat and dropout rates replace what a checkpoint carries.
  settings = dict(dtype=config_lib.compute_dtype(config.model.dtype),
                  remat=bool(config.model.remat), dropout=float(config.model.dropout),
                  attention_dropout=float(config.model.attention_dropout))
  if init_from:
    model_dir = workdir_lib.resolve_model_dir(init_from, kind, field)
    cfg, params = models.load_hf(model_dir)
    cfg = cfg.replace(**settings)
    loaded_kind = "scalar" if "head" in params else "causal"
    fresh_head = loaded_kind != kind
    if fresh_head:
      if kind == "scalar":
        params = models.causal_to_scalar(cfg, params,
                                         jax.random.PRNGKey(config.seed + seed_offset))
      else:
        raise ConfigError(field, init_from, "a causal LM (got a reward/value model)")
    model = place(mesh, rules, cfg, kind, jax.device_get(params), model_dir)
    model.fresh_head = fresh_head
  else:
    try:
      cfg = models.get_preset(config.model.preset).replace(**settings)
    except ValueError as e:
      raise ConfigError("model.preset", config.model.preset, str(e).split("; ")[-1]) from None
    if tokenizer is not None:
      cfg = cfg.replace(vocab_size=max(cfg.vocab_size, len(tokenizer)) if
                        config.model.preset != "tiny" else len(tokenizer),
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id)
    shardings = state_lib.model_shardings(mesh, cfg, kind, rules)
    rng = jax.random.PRNGKey(config.seed + seed_offset)
    params = jax.jit(lambda: models.init(cfg, rng, kind=kind), out_shardings=shardings)()
    model = Model(cfg, params, shardings, f"random init of preset {config.model.preset!r}")
  if tokenizer is not None:
    check_vocab(tokenizer, model.cfg, f"model from {model.source}")
  return model
