"""A stage's starting point: its mesh, its tokenizer and each model's weights on the mesh.

`model.init_from` may be a local HF directory (config.json + safetensors) or a previous
stage's workdir (its `export/policy` or `export/reward_model`, `workdir.resolve_model_dir`);
empty means a random init of `model.preset`, sized to the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax

from rlhf_jax import config as config_lib
from rlhf_jax import models, sampling, sharding
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


def frozen_weights(cfg, params):
  """A read-only model's params in the compute dtype, with the same forward pass.

  Every matrix but a scalar head is cast to `cfg.dtype`, which is what the layers do to it
  before every use (`sampling.compute_dtype_weights`), so a model that is only read
  (PPO's reference policy and reward model) gives the same numbers at 2 bytes a param under
  bfloat16 instead of the float32 master's 4. The scalar head ([D, 1]) is read in float32
  (`score_head`) and vectors (norm scales, biases) as they are: both stay untouched.
  """
  cast = sampling.compute_dtype_weights(cfg, {k: v for k, v in params.items() if k != "head"})
  if "head" in params:
    cast["head"] = params["head"]
  return cast


def frozen(model: Model) -> Model:
  """`model` as a read-only compute-dtype copy (`frozen_weights`), sharded as before.

  No optimiser state and no float32 master copy: the caller drops the float32 params.
  Under float32 compute the model comes back as it is; abstract params
  (`jax.ShapeDtypeStruct`, as the memory benchmark uses) come back abstract.
  """
  target = jax.eval_shape(functools.partial(frozen_weights, model.cfg), model.params)
  if all(t.dtype == p.dtype for t, p in zip(jax.tree.leaves(target),
                                            jax.tree.leaves(model.params))):
    return model
  if any(isinstance(p, jax.ShapeDtypeStruct) for p in jax.tree.leaves(model.params)):
    params = state_lib.abstract_with_shardings(target, model.shardings)
  else:
    params = jax.jit(functools.partial(frozen_weights, model.cfg),
                     out_shardings=model.shardings)(model.params)
  return dataclasses.replace(model, params=params)


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
    # Each device reads only its slice of each tensor: no host holds the whole checkpoint.
    cfg, loaded_kind, params = models.load_hf_sharded(
        model_dir, lambda c, k: state_lib.model_shardings(mesh, c, k, rules), kind=kind)
    cfg = cfg.replace(**settings)
    fresh_head = loaded_kind != kind
    if fresh_head and kind != "scalar":
      raise ConfigError(field, init_from, "a causal LM (got a reward/value model)")
    shardings = state_lib.model_shardings(mesh, cfg, kind, rules)
    if fresh_head:  # only the backbone was read; the small new head is made on every host
      head = models.causal_to_scalar(cfg, params, jax.random.PRNGKey(config.seed + seed_offset))
      params = dict(params, head=state_lib.place(jax.device_get(head["head"]),
                                                 shardings["head"]))
    model = Model(cfg, params, shardings, model_dir, fresh_head)
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
