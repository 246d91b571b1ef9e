"""LoRA (Hu et al. 2021, arXiv:2106.09685) over the plain param dicts of `api.py`.

A targeted kernel W (ours: [*in, *out]) is used as W + (alpha / r) · A·B (Hu et al. eq. 3,
with the alpha / r scaling of §4.1), A: [*in, r], B: [r, *out]. B starts at 0, so step 0
is exactly the base model; only A and B (and a scalar model's head) are trained.

Why our own and not qwix: qwix (0.1.x) adds LoRA by intercepting `jax.lax.dot_general` /
`jnp.einsum` while it runs a concrete NNX module once, and stores the factors as new
`nnx.LoRAParam` attributes of that module. Our boundary is different: params are plain dicts
merged into one cached abstract graph per (cfg, kind) inside jit, the frozen base is shared
with the PPO reference, and the export needs merged HF weights and PEFT-named factors, which
qwix does not write. Merging the factors into the dicts before the graph sees them keeps
`models.logits`, `sampling.generate` and the KV cache unchanged and is ~200 lines.

Targets are named like the HF modules (and PEFT's `target_modules`): for Llama / Qwen2 /
Mistral `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`; for GPT-2 `c_attn` (one
adapter on the fused q|k|v projection, as PEFT does), `c_proj` (attention and MLP output
projections, both so named) and `c_fc`. `all` is every one of the family's.

The adapter tree: {"layer_i": {group: {name: {"a": A, "b": B}}}}, group/name the HF
module path inside a block (e.g. "self_attn"/"q_proj", "mlp"/"c_proj").

Memory: `merge` materialises W + s·A·B for each targeted kernel in float32 inside the jitted
step (a transient copy of the targeted kernels, not of the model), and its gradient w.r.t.
A and B passes through a kernel-sized dW. Untargeted leaves are the base's own arrays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import ConfigError
from rlhf_jax.models import api
from rlhf_jax.models.config import ModelConfig

# family -> [(group, name, our kernels (module paths under a block), in_ndim)]
_LLAMA = [("self_attn", "q_proj", [("attn", "q")], 1),
          ("self_attn", "k_proj", [("attn", "k")], 1),
          ("self_attn", "v_proj", [("attn", "v")], 1),
          ("self_attn", "o_proj", [("attn", "o")], 2),
          ("mlp", "gate_proj", [("mlp", "gate")], 1),
          ("mlp", "up_proj", [("mlp", "up")], 1),
          ("mlp", "down_proj", [("mlp", "down")], 1)]
_SITES = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA,
    "gpt2": [("attn", "c_attn", [("attn", "q"), ("attn", "k"), ("attn", "v")], 1),
             ("attn", "c_proj", [("attn", "o")], 2),
             ("mlp", "c_fc", [("mlp", "up")], 1),
             ("mlp", "c_proj", [("mlp", "down")], 1)],
}
# `targets=''`: the attention projections the LoRA paper adapts (W_q, W_v; §7.1), and
# PEFT's GPT-2 default (the fused c_attn).
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
                   "mistral": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}
ALL_NAMES = sorted({name for sites in _SITES.values() for _, name, _, _ in sites})
_HF_LAYER = {"gpt2": "transformer.h.", "llama": "model.layers.", "qwen2": "model.layers.",
             "mistral": "model.layers."}
FIELD = "model.lora.targets"


@dataclasses.dataclass(frozen=True)
class Spec:
  """A LoRA setting (hashable: a static argument of jitted functions)."""
  rank: int
  alpha: float
  targets: tuple = ()        # () = the family's DEFAULT_TARGETS; ("all",) = every site

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


def spec_from_config(lora_cfg) -> Optional[Spec]:
  """`config.model.lora` -> a Spec, or None when `rank` is 0 (LoRA off)."""
  if lora_cfg is None or int(lora_cfg.rank) == 0:
    return None
  targets = tuple(t.strip() for t in str(lora_cfg.targets).split(",") if t.strip())
  return Spec(int(lora_cfg.rank), float(lora_cfg.alpha), targets)


def check_names(targets: tuple) -> None:
  """Raises ConfigError (model.lora.targets) for a name no family knows."""
  for t in targets:
    if t != "all" and t not in ALL_NAMES:
      raise ConfigError(FIELD, ",".join(targets),
                        "comma-separated HF module names among " + ", ".join(ALL_NAMES)
                        + ", or 'all' ('' = the family's attention q/v projections)")


def sites(cfg: ModelConfig, spec: Spec) -> list:
  """The targeted (group, name, kernels, in_ndim) of `cfg`'s family; ConfigError otherwise."""
  if cfg.family not in _SITES:
    raise ConfigError("model.lora.rank", spec.rank, "0 for family "
                      f"{cfg.family!r}: LoRA supports " + ", ".join(sorted(_SITES)))
  table = _SITES[cfg.family]
  valid = [name for _, name, _, _ in table]
  targets = spec.targets or DEFAULT_TARGETS[cfg.family]
  if "all" in targets:
    return list(table)
  for t in targets:
    if t not in valid:
      raise ConfigError(FIELD, ",".join(targets), f"names of {cfg.family} modules: "
                        + ", ".join(dict.fromkeys(valid)) + ", or 'all'")
  return [s for s in table if s[1] in targets]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _replace(tree: dict, path: tuple, value) -> dict:
  """A shallow-copied `tree` with the leaf at `path` replaced (the input is not modified)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


def _shapes_and_axes(cfg: ModelConfig, site) -> tuple:
  """(in shape, out shape, in axes, out axes) of one site's adapter (fused: a leading 3)."""
  _, _, kernels, n_in = site
  abstract = api.abstract_params(cfg, "causal")
  axes = api.logical_axes(cfg, "causal")
  path = ("backbone", "layer_0") + kernels[0] + ("kernel",)
  shape = tuple(_get(abstract, path).shape)
  names = tuple(_get(axes, path))
  in_shape, out_shape = shape[:n_in], shape[n_in:]
  in_axes, out_axes = names[:n_in], names[n_in:]
  if len(kernels) > 1:
    out_shape, out_axes = (len(kernels),) + out_shape, (None,) + out_axes
  return in_shape, out_shape, in_axes, out_axes


def init_adapters(cfg: ModelConfig, spec: Spec, rng) -> dict:
  """Fresh factors: A ~ N(0, 1 / fan_in) (Hu et al. §4.1: Gaussian A), B = 0."""
  out: dict = {}
  targeted = sites(cfg, spec)
  shapes = [_shapes_and_axes(cfg, site)[:2] for site in targeted]
  for i in range(cfg.num_layers):
    for j, site in enumerate(targeted):
      group, name = site[0], site[1]
      in_shape, out_shape = shapes[j]
      key = jax.random.fold_in(rng, i * len(targeted) + j)
      a = jax.random.normal(key, in_shape + (spec.rank,), jnp.float32) \
          / math.sqrt(math.prod(in_shape))
      b = jnp.zeros((spec.rank,) + out_shape, jnp.float32)
      out.setdefault(f"layer_{i}", {}).setdefault(group, {})[name] = {"a": a, "b": b}
  return out


def adapter_axes(cfg: ModelConfig, spec: Spec) -> dict:
  """Logical axes of `init_adapters`' tree: A shards like the kernel's input dims, B like
  its output dims; the rank dim is never sharded."""
  out: dict = {}
  for site in sites(cfg, spec):
    _, _, in_axes, out_axes = _shapes_and_axes(cfg, site)
    for i in range(cfg.num_layers):
      out.setdefault(f"layer_{i}", {}).setdefault(site[0], {})[site[1]] = {
          "a": tuple(in_axes) + (None,), "b": (None,) + tuple(out_axes)}
  return out


def merge(cfg: ModelConfig, params: dict, adapters: dict, spec: Spec, xp=jnp) -> dict:
  """`params` with W + (alpha / r)·A·B at every targeted kernel (jit-able, pure).

  The untargeted leaves are `params`' own arrays (no copy); see the module docstring for
  the transient memory of the merged kernels. A compute-dtype (bfloat16) base is promoted
  to float32 by the float32 update. `xp=np` merges host arrays (the export).
  """
  for site in sites(cfg, spec):
    group, name, kernels, n_in = site
    for i in range(cfg.num_layers):
      ad = adapters[f"layer_{i}"][group][name]
      delta = xp.tensordot(xp.asarray(ad["a"], xp.float32), xp.asarray(ad["b"], xp.float32),
                           axes=1) * xp.float32(spec.scale)
      for j, module in enumerate(kernels):
        path = ("backbone", f"layer_{i}") + module + ("kernel",)
        d = xp.take(delta, j, axis=n_in) if len(kernels) > 1 else delta
        params = _replace(params, path, _get(params, path) + d)
  return params


# -- what a trainer holds: the trainable tree and the frozen base ------------------------

def init_trainable(cfg: ModelConfig, params: dict, spec: Spec, rng) -> dict:
  """What the optimiser sees: {"adapters": ...}, plus a scalar model's "head" (a value or
  reward head is task-specific, so it is trained in full, like PEFT's modules_to_save)."""
  out = {"adapters": init_adapters(cfg, spec, rng)}
  if api.kind_of(params) == "scalar":
    out["head"] = jax.tree.map(jnp.copy, params["head"])
  return out


def trainable_and_frozen(cfg: ModelConfig, params: dict, spec: Spec, rng) -> tuple:
  """(trainable, frozen): `init_trainable`, and the base params themselves (no copy)."""
  return init_trainable(cfg, params, spec, rng), params


def trainable_axes(cfg: ModelConfig, spec: Spec, kind: str) -> dict:
  out = {"adapters": adapter_axes(cfg, spec)}
  if kind == "scalar":
    out["head"] = api.logical_axes(cfg, "scalar")["head"]
  return out


def full_params(cfg: ModelConfig, frozen: dict, trainable: dict, spec: Spec, xp=jnp) -> dict:
  """The model the trainable tree stands for: the merged kernels (and the trained head)."""
  params = merge(cfg, frozen, trainable["adapters"], spec, xp)
  if "head" in trainable:
    params = dict(params, head=trainable["head"])
  return params


def changed_leaves(cfg: ModelConfig, frozen: dict, trainable: dict, spec: Spec) -> dict:
  """{param path: new leaf} of `full_params` (the merged kernels, a trained head): a jitted
  merge returns these alone and `with_leaves` puts them into the base dict, so the
  untargeted weights are the base's own buffers rather than jit outputs."""
  params = full_params(cfg, frozen, trainable, spec)
  out = {}
  for _, _, kernels, _ in sites(cfg, spec):
    for i in range(cfg.num_layers):
      for module in kernels:
        path = ("backbone", f"layer_{i}") + module + ("kernel",)
        out["/".join(path)] = _get(params, path)
  if "head" in trainable:
    out["head"] = trainable["head"]
  return out


def with_leaves(params: dict, leaves: dict) -> dict:
  """`params` with each "a/b/c" path of `leaves` replaced (see `changed_leaves`)."""
  for path, value in leaves.items():
    params = _replace(params, tuple(path.split("/")), value)
  return params


def count(cfg: ModelConfig, spec: Spec, kind: str = "causal") -> int:
  """Trained parameters in closed form: Σ over targeted kernels of r·(in + out), fused
  q|k|v counted once with out = q + k + v (as PEFT's c_attn), plus a scalar head."""
  total = 0
  for site in sites(cfg, spec):
    in_shape, out_shape, _, _ = _shapes_and_axes(cfg, site)
    total += cfg.num_layers * spec.rank * (math.prod(in_shape) + math.prod(out_shape))
  if kind == "scalar":
    total += cfg.hidden_size + 1
  return total


# -- the PEFT adapter format ---------------------------------------------------------------

def peft_tensors(cfg: ModelConfig, adapters: dict, spec: Spec) -> dict:
  """HF/PEFT names -> float32 numpy: lora_A.weight [r, in], lora_B.weight [out, r], with
  `in` / `out` flattened in the HF weight's order (as `hf._entries` lays the kernels out)."""
  out = {}
  for group, name, _, _ in sites(cfg, spec):
    for i in range(cfg.num_layers):
      ad = adapters[f"layer_{i}"][group][name]
      a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
      base = f"base_model.model.{_HF_LAYER[cfg.family]}{i}.{group}.{name}"
      out[f"{base}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
      out[f"{base}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
  return out


def save_peft(cfg: ModelConfig, adapters: dict, spec: Spec, out_dir: str,
              base_model_name_or_path: str = "") -> str:
  """Writes `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained(base, out_dir)` loads (host arrays in `adapters`)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  names = sorted({s[1] for s in sites(cfg, spec)})
  config = dict(
      peft_type="LORA", task_type="CAUSAL_LM", r=spec.rank, lora_alpha=spec.alpha,
      target_modules=names, lora_dropout=0.0, bias="none",
      # GPT-2's Conv1D stores weights [in, out]; PEFT then transposes the delta.
      fan_in_fan_out=cfg.family == "gpt2", base_model_name_or_path=base_model_name_or_path,
      inference_mode=True, use_rslora=False, use_dora=False, modules_to_save=None,
      init_lora_weights=True)
  # Written under a temporary name and renamed into place: never half-written.
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(peft_tensors(cfg, adapters, spec),
            os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir
