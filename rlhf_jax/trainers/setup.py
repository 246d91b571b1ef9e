"""What every stage does before its first step: mesh, tokenizer, initial weights, export.

`model.init_from` may be a local HF directory (config.json + safetensors) or a previous
stage's workdir (its `export/policy` or `export/reward_model`); empty means a random init of
`model.preset`. Everything that is loaded is announced in one log line.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax
import numpy as np

from rlhf_jax import models, sharding
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.trainers import state as state_lib

log = logging.getLogger("rlhf_jax")

EXPORT_NAMES = {"causal": "policy", "scalar": "reward_model"}
RM_NORMALIZATION_FILE = "reward_normalization.json"


def make_mesh(config):
  try:
    return sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise ConfigError("mesh", dict(config.mesh), str(e)) from None


def resolve_model_dir(path: str, kind: str, field: str = "model.init_from") -> str:
  """An HF model dir from a user path: the dir itself, or a workdir's export of `kind`."""
  path = os.path.expanduser(path)
  candidates = [path, os.path.join(path, "export", EXPORT_NAMES[kind])]
  if kind == "scalar":  # a value model may start from a policy's workdir too
    candidates.append(os.path.join(path, "export", "policy"))
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise ConfigError(field, path, "a local HF model directory (with config.json) or a "
                    f"workdir containing export/{EXPORT_NAMES[kind]}/config.json")


def load_tokenizer(config, model_dir: Optional[str]):
  """The tokenizer named by `config.tokenizer`, else the one saved with the model."""
  import transformers
  candidates = [os.path.expanduser(config.tokenizer)] if config.tokenizer else []
  if model_dir:
    candidates.append(model_dir)
  for path in candidates:
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")) or \
        os.path.isfile(os.path.join(path, "tokenizer.json")):
      tok = transformers.AutoTokenizer.from_pretrained(path)
      if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token   # decoder-only models often ship without a pad token
      return tok
  if config.task == "default":
    from rlhf_jax import tasks
    return tasks.build_tokenizer()
  raise ConfigError("tokenizer", config.tokenizer,
                    "a tokenizer directory (none found next to model.init_from either)")


def check_vocab(tokenizer, cfg, what: str) -> None:
  if len(tokenizer) > cfg.vocab_size:
    raise UserError(
        f"tokenizer has {len(tokenizer)} tokens but the {what} has vocab_size="
        f"{cfg.vocab_size}: they do not belong together (set config.tokenizer or "
        "model.init_from to a matching pair)")


def initial_model(config, mesh, rules, kind: str, init_from: str, seed_offset: int = 0,
                  tokenizer=None, field: str = "model.init_from"):
  """(cfg, params placed on the mesh, source description) for one model of a stage."""
  dtype, remat = config.model.dtype, bool(config.model.remat)
  if init_from:
    model_dir = resolve_model_dir(init_from, kind, field)
    cfg, params = models.load_hf(model_dir)
    cfg = cfg.replace(dtype=dtype, remat=remat)
    loaded_kind = "scalar" if "head" in params else "causal"
    if loaded_kind != kind:
      if kind == "scalar":
        params = models.causal_to_scalar(cfg, params,
                                         jax.random.PRNGKey(config.seed + seed_offset))
      else:
        raise ConfigError(field, init_from, "a causal LM (got a reward/value model)")
    params = jax.device_get(params)
    shardings = state_lib.model_shardings(mesh, cfg, kind, rules)
    params = state_lib.place(params, shardings)
    source = model_dir
  else:
    try:
      cfg = models.get_preset(config.model.preset).replace(dtype=dtype, remat=remat)
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
    source = f"random init of preset {config.model.preset!r}"
  if tokenizer is not None:
    check_vocab(tokenizer, cfg, f"model from {source}")
  return cfg, params, shardings, source


def announce(stage: str, mesh, loaded: dict, counts: dict, batch: dict) -> None:
  parts = [f"[{stage}] mesh {dict(mesh.shape)} on {jax.device_count()} devices "
           f"({jax.process_count()} processes)"]
  parts += [f"{name}: {src} ({counts[name] / 1e6:.2f}M params)" for name, src in loaded.items()]
  parts.append("batch " + ", ".join(f"{k}={v}" for k, v in batch.items()))
  log.info("; ".join(parts))


def host_copy(tree):
  """Numpy copy of a tree of global arrays on every process (a collective when multi-host).

  `jax.device_get` cannot fetch an array split across processes (e.g. FSDP over hosts);
  `process_allgather` gathers it, so every process must call this together.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def export(workdir: str, cfg, params, tokenizer, kind: str, extra: Optional[dict] = None
           ) -> str:
  """Writes an HF-format copy under `<workdir>/export/<policy|reward_model>` (process 0)."""
  out = os.path.join(workdir, "export", EXPORT_NAMES[kind])
  host_params = host_copy(params)
  if jax.process_index() == 0:
    models.save_hf(cfg, host_params, out)
    if tokenizer is not None:
      tokenizer.save_pretrained(out)
    if extra is not None:
      with open(os.path.join(out, RM_NORMALIZATION_FILE), "w") as f:
        json.dump(extra, f, indent=2)
  return out


def read_rm_normalization(model_dir: str) -> dict:
  path = os.path.join(model_dir, RM_NORMALIZATION_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return dict(mean=0.0, std=1.0, gain=False)
