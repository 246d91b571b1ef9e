"""HF `config.json` <-> `ModelConfig`, for every supported family.

Reads configs as written by transformers 4.x (top-level `rope_theta`, `rotary_pct`,
`rotary_emb_base`, `rope_scaling`) and 5.x (`rope_parameters` holding `rope_theta`,
`partial_rotary_factor` and the scaling fields). Writes through the installed transformers'
own config classes, so the file is in the format that version expects.
"""

from __future__ import annotations

from typing import Any, Optional

from rlhf_jax.models.config import ModelConfig

# HF model_type -> our family.
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "mistral": "mistral",
               "gpt_neox": "gpt_neox"}

# (family, kind) -> HF architecture class name (the first is what save_hf writes).
ARCHITECTURES = {
    ("gpt2", "causal"): "GPT2LMHeadModel",
    ("gpt2", "scalar"): "GPT2ForSequenceClassification",
    ("llama", "causal"): "LlamaForCausalLM",
    ("llama", "scalar"): "LlamaForSequenceClassification",
    ("qwen2", "causal"): "Qwen2ForCausalLM",
    ("qwen2", "scalar"): "Qwen2ForSequenceClassification",
    ("mistral", "causal"): "MistralForCausalLM",
    ("mistral", "scalar"): "MistralForSequenceClassification",
    ("gpt_neox", "causal"): "GPTNeoXForCausalLM",
    ("gpt_neox", "scalar"): "GPTNeoXForSequenceClassification",
}
_ARCH_TO = {arch: key for key, arch in ARCHITECTURES.items()}

_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new",
                "gelu": "gelu", "silu": "silu", "swish": "silu"}


def family_and_kind(hf: dict, where: str) -> tuple[str, str]:
  """(family, kind) from `architectures[0]` (preferred) or `model_type`."""
  archs = hf.get("architectures") or []
  if archs:
    arch = archs[0]
    if arch not in _ARCH_TO:
      known = sorted(_ARCH_TO)
      raise ValueError(f"{where}: unknown architecture {arch!r}; supported: {known}")
    return _ARCH_TO[arch]
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{where}: unknown model_type {model_type!r} and no 'architectures'; "
                     f"supported model types: {sorted(MODEL_TYPES)}")
  return MODEL_TYPES[model_type], "causal"


def _activation(name: str, where: str) -> str:
  if name not in _ACTIVATIONS:
    raise NotImplementedError(f"{where}: activation {name!r} is not supported "
                              f"(supported: {sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[name]


def _first_id(x) -> Optional[int]:
  # Llama-3 instruct lists several EOS ids; ModelConfig keeps the first.
  if isinstance(x, (list, tuple)):
    return int(x[0]) if x else None
  return None if x is None else int(x)


def _rope(hf: dict, where: str, default_theta: float, default_pct: float) -> dict:
  """RoPE fields of ModelConfig from either config generation."""
  rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rp and all(isinstance(v, dict) or v is None for v in rp.values()):
    raise NotImplementedError(f"{where}: per-layer-type rope_parameters {sorted(rp)} "
                              "are not supported")
  theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
  pct = rp.get("partial_rotary_factor",
               hf.get("partial_rotary_factor", hf.get("rotary_pct", default_pct)))
  kind = rp.get("rope_type", rp.get("type", "default"))
  out: dict[str, Any] = dict(rope_theta=float(theta), rotary_pct=float(pct))
  if kind in (None, "default"):
    return out
  if kind == "linear":
    return dict(out, rope_scaling_type="linear", rope_scaling_factor=float(rp["factor"]))
  if kind == "llama3":
    return dict(out, rope_scaling_type="llama3", rope_scaling_factor=float(rp["factor"]),
                rope_low_freq_factor=float(rp["low_freq_factor"]),
                rope_high_freq_factor=float(rp["high_freq_factor"]),
                rope_original_max_position=int(rp.get(
                    "original_max_position_embeddings", hf.get("max_position_embeddings"))))
  raise NotImplementedError(f"{where}: rope scaling type {kind!r} is not supported "
                            "(supported: default, linear, llama3)")


def _token_ids(hf: dict) -> dict:
  return dict(bos_token_id=_first_id(hf.get("bos_token_id")),
              eos_token_id=_first_id(hf.get("eos_token_id")),
              pad_token_id=_first_id(hf.get("pad_token_id")))


def _llama_like(hf: dict, family: str, where: str) -> ModelConfig:
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or n
  head_dim = hf.get("head_dim") or d // n
  if family == "qwen2":
    qkv_bias, out_bias, mlp_bias = True, False, False
    window = None
    if hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
      layers = hf["num_hidden_layers"]
      types = hf.get("layer_types") or [
          "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
          for i in range(layers)]
      if all(t == "sliding_attention" for t in types):
        window = int(hf["sliding_window"])
      elif any(t == "sliding_attention" for t in types):
        raise NotImplementedError(f"{where}: Qwen2 with sliding window on only some layers "
                                  f"(layer_types={types}) is not supported")
  elif family == "mistral":
    qkv_bias = out_bias = mlp_bias = False
    window = hf.get("sliding_window")
  else:
    qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    window = None
  return ModelConfig(
      family=family, vocab_size=hf["vocab_size"], hidden_size=d,
      num_layers=hf["num_hidden_layers"], num_heads=n, num_kv_heads=kv, head_dim=head_dim,
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      norm_type="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      activation=_activation(hf.get("hidden_act", "silu"), where), gated_mlp=True,
      position_type="rope", qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_window=None if window is None else int(window),
      **_rope(hf, where, 10000.0, 1.0), **_token_ids(hf))


def _gpt2(hf: dict, where: str) -> ModelConfig:
  if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
    raise NotImplementedError(f"{where}: GPT-2 attention scaling variants "
                              "(scale_attn_by_inverse_layer_idx / scale_attn_weights=false) "
                              "are not supported")
  if hf.get("add_cross_attention", False):
    raise NotImplementedError(f"{where}: GPT-2 with cross-attention is not supported")
  d, n = hf["n_embd"], hf["n_head"]
  return ModelConfig(
      family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
      num_heads=n, num_kv_heads=n, head_dim=d // n,
      intermediate_size=hf.get("n_inner") or 4 * d,
      max_position_embeddings=hf.get("n_positions", 1024), norm_type="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      activation=_activation(hf.get("activation_function", "gelu_new"), where),
      gated_mlp=False, position_type="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), **_token_ids(hf))


def _gpt_neox(hf: dict, where: str) -> ModelConfig:
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  bias = bool(hf.get("attention_bias", True))
  return ModelConfig(
      family="gpt_neox", vocab_size=hf["vocab_size"], hidden_size=d,
      num_layers=hf["num_hidden_layers"], num_heads=n, num_kv_heads=n, head_dim=d // n,
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_type="layernorm",
      norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
      activation=_activation(hf.get("hidden_act", "gelu"), where), gated_mlp=False,
      position_type="rope", parallel_residual=bool(hf.get("use_parallel_residual", True)),
      qkv_bias=bias, out_bias=bias, mlp_bias=True,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **_rope(hf, where, 10000.0, 0.25), **_token_ids(hf))


def from_hf_config(hf: dict, where: str) -> tuple[ModelConfig, str]:
  """(ModelConfig, kind) from a parsed HF config.json; `where` names the file in errors."""
  family, kind = family_and_kind(hf, where)
  try:
    if family == "gpt2":
      cfg = _gpt2(hf, where)
    elif family == "gpt_neox":
      cfg = _gpt_neox(hf, where)
    else:
      cfg = _llama_like(hf, family, where)
  except KeyError as e:
    raise ValueError(f"{where}: missing config field {e.args[0]!r} for family {family}") from None
  if kind == "scalar" and int(hf.get("num_labels", len(hf.get("id2label") or [0]))) != 1:
    raise ValueError(f"{where}: sequence classification with num_labels != 1 is not supported "
                     "(a reward / value model has one label)")
  return cfg, kind


def _rope_kwargs(cfg: ModelConfig) -> dict:
  """Legacy-style RoPE kwargs; transformers 4.x and 5.x config classes both accept them."""
  out: dict[str, Any] = {}
  if cfg.rope_scaling_type == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling_type == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_position}
  return out


def to_hf_config(cfg: ModelConfig, kind: str):
  """A `transformers.PretrainedConfig` for (cfg, kind), ready for `save_pretrained`."""
  import transformers  # pylint: disable=import-outside-toplevel

  arch = ARCHITECTURES[(cfg.family, kind)]
  ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
             pad_token_id=cfg.pad_token_id)
  if kind == "scalar" and ids["pad_token_id"] is None:
    # HF sequence classification finds the last non-pad token through pad_token_id and
    # refuses batches > 1 without one. `hf.save_hf` always passes an id distinct from EOS
    # (see its module docstring); EOS here only serves direct callers of this function.
    ids["pad_token_id"] = cfg.eos_token_id
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
                architectures=[arch], **ids)
  if kind == "scalar":
    common["num_labels"] = 1
  if cfg.family == "gpt2":
    _require(cfg, dict(norm_type="layernorm", gated_mlp=False, position_type="learned",
                       qkv_bias=True, out_bias=True, mlp_bias=True, parallel_residual=False,
                       sliding_window=None), cfg.num_kv_heads == cfg.num_heads
             and cfg.head_dim * cfg.num_heads == cfg.hidden_size)
    hf = transformers.GPT2Config(
        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation, **common)
  elif cfg.family == "gpt_neox":
    _require(cfg, dict(norm_type="layernorm", gated_mlp=False, position_type="rope",
                       mlp_bias=True, sliding_window=None, rope_scaling_type=None),
             cfg.qkv_bias == cfg.out_bias and cfg.num_kv_heads == cfg.num_heads
             and cfg.head_dim * cfg.num_heads == cfg.hidden_size)
    hf = transformers.GPTNeoXConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.norm_eps,
        hidden_act=cfg.activation, use_parallel_residual=cfg.parallel_residual,
        attention_bias=cfg.qkv_bias, rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta,
        **common)
  else:
    _require(cfg, dict(norm_type="rmsnorm", gated_mlp=True, position_type="rope",
                       parallel_residual=False, rotary_pct=1.0), True)
    llama_like = dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        hidden_act=cfg.activation, rope_theta=cfg.rope_theta, **_rope_kwargs(cfg), **common)
    if cfg.family == "llama":
      _require(cfg, dict(sliding_window=None), cfg.qkv_bias == cfg.out_bias)
      hf = transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                                    **llama_like)
    elif cfg.family == "qwen2":
      _require(cfg, dict(qkv_bias=True, out_bias=False, mlp_bias=False), True)
      window = dict(use_sliding_window=False)
      if cfg.sliding_window is not None:
        window = dict(use_sliding_window=True, sliding_window=cfg.sliding_window,
                      max_window_layers=0)
      hf = transformers.Qwen2Config(**window, **llama_like)
    else:
      _require(cfg, dict(qkv_bias=False, out_bias=False, mlp_bias=False), True)
      hf = transformers.MistralConfig(sliding_window=cfg.sliding_window, **llama_like)
  # transformers 5.x calls it `dtype`, 4.x `torch_dtype` (5.x warns on the old name).
  if int(transformers.__version__.split(".")[0]) >= 5:
    hf.dtype = "float32"
  else:
    hf.torch_dtype = "float32"
  return hf


def _require(cfg: ModelConfig, fields: dict, other_ok: bool) -> None:
  bad = {k: getattr(cfg, k) for k, v in fields.items() if getattr(cfg, k) != v}
  if bad or not other_ok:
    raise ValueError(f"save_hf: ModelConfig(family={cfg.family!r}) cannot be written as an HF "
                     f"{cfg.family} model: fields {bad or 'head/bias layout'} differ from what "
                     f"that architecture supports")
