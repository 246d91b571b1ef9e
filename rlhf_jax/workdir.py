"""The on-disk contract of a run's workdir, shared by the trainers and the built-in pipeline.

    <workdir>/metrics.jsonl, tb/, checkpoints/      written by the host loop
    <workdir>/export/policy/                        HF causal LM + tokenizer
    <workdir>/export/reward_model/                  HF sequence-classification model + tokenizer
        reward_normalization.json                   {"mean", "std", "gain", "n"}: r <- (r - mean) [/ std]

A user path to a model is either an HF directory itself or a workdir whose `export/` holds
one (`resolve_model_dir`). Exports are written by process 0 while every process joins the
gather of each possibly host-split tensor in turn (`export`, `models.save_hf`).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.errors import ConfigError

EXPORT_NAMES = {"causal": "policy", "scalar": "reward_model"}
RM_NORMALIZATION_FILE = "reward_normalization.json"
NO_NORMALIZATION = dict(mean=0.0, std=1.0, gain=False)


def resolve_model_dir(path: str, kind: str, field: str = "model.init_from") -> str:
  """An HF model dir from a user path: the dir itself, or a workdir's export of `kind`.

  Raises:
    ConfigError: naming `field` when neither holds a config.json.
  """
  path = os.path.expanduser(path)
  candidates = [path, os.path.join(path, "export", EXPORT_NAMES[kind])]
  if kind == "scalar":  # a value model may start from a policy's workdir too
    candidates.append(os.path.join(path, "export", "policy"))
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise ConfigError(field, path, "a local HF model directory (with config.json) or a "
                    f"workdir containing export/{EXPORT_NAMES[kind]}/config.json")


def has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f))
             for f in ("tokenizer_config.json", "tokenizer.json"))


def read_tokenizer(path: str):
  """The HF tokenizer saved in `path`; pad = EOS when it has no pad token (decoder-only
  models often ship without one)."""
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(path)
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


def read_rm_normalization(model_dir: str) -> dict:
  """The normalisation saved next to an exported reward model (none: identity)."""
  path = os.path.join(model_dir, RM_NORMALIZATION_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return dict(NO_NORMALIZATION)


def host_copy(tree):
  """Numpy copy of a tree of global arrays on every process (a collective when multi-host).

  `jax.device_get` cannot fetch an array split across processes (e.g. FSDP over hosts);
  `process_allgather` gathers it, so every process must call this together.
  """
  if jax.process_count() == 1 or all(getattr(x, "is_fully_addressable", True)
                                     for x in jax.tree.leaves(tree)):
    # This process holds every shard (e.g. the pipeline's sampling on its own first
    # device): a plain copy; `process_allgather` would concatenate every process's copy.
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def export_adapter(workdir: str, cfg, adapters, spec, base_model: str = "") -> str:
  """Writes a LoRA adapter alone in the PEFT format under `<workdir>/export/adapter`
  (process 0; every process joins the gather). `base_model`: the HF dir it adapts."""
  from rlhf_jax.models import lora
  out = os.path.join(workdir, "export", "adapter")
  host = host_copy(adapters)
  if jax.process_index() == 0:
    base = os.path.abspath(base_model) if base_model and os.path.isdir(base_model) else ""
    lora.save_peft(cfg, host, spec, out, base_model_name_or_path=base)
  return out


def export(workdir: str, cfg, params, tokenizer, kind: str,
           normalization: Optional[dict] = None, name: Optional[str] = None) -> str:
  """Writes an HF-format copy under `<workdir>/export/<policy|reward_model>` (process 0);
  `name` replaces the kind's directory name (PPO's value model: `export/value_model`)."""
  out = os.path.join(workdir, "export", name or EXPORT_NAMES[kind])
  # Every process calls save_hf: it gathers one tensor at a time (never the whole model on
  # one host) and process 0 writes. A scalar model's config gets a pad id distinct from EOS
  # (`models.save_hf`), so that transformers reads the score at the same token as here; the
  # tokenizer shows which embedding rows are free.
  models.save_hf(cfg, params, out, tokenizer=tokenizer if kind == "scalar" else None)
  if jax.process_index() == 0:
    if tokenizer is not None:
      tokenizer.save_pretrained(out)
    if normalization is not None:
      with open(os.path.join(out, RM_NORMALIZATION_FILE), "w") as f:
        json.dump(normalization, f, indent=2)
  return out
