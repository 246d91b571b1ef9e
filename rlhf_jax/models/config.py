"""The static description of a decoder-only transformer.

One frozen (hashable) dataclass covers every supported family; it is passed as a
static argument to jitted functions, so two equal configs share one compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters.

  Attributes:
    family: one of FAMILIES; decides the HF name mapping on import/export.
    vocab_size: rows of the token embedding.
    hidden_size: model width D.
    num_layers: number of decoder blocks.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (grouped-query attention when K < N).
    head_dim: per-head width H (usually hidden_size // num_heads).
    intermediate_size: MLP hidden width F.
    max_position_embeddings: learned-position table size / longest sequence.
    norm_type: "layernorm" (with bias) or "rmsnorm".
    norm_eps: epsilon inside the norm.
    activation: "gelu_new" (tanh approx), "gelu" (exact erf) or "silu".
    gated_mlp: SwiGLU-style gate * up -> down (Llama) vs. plain fc -> proj.
    position_type: "learned" (GPT-2) or "rope".
    rope_theta: RoPE base.
    rope_scaling_type: None (plain RoPE), "linear" or "llama3" (Llama-3.1/3.2 frequency
      scaling); the next four fields parameterise it as in HF `rope_parameters`.
    rope_scaling_factor: "factor".
    rope_low_freq_factor: "low_freq_factor" (llama3).
    rope_high_freq_factor: "high_freq_factor" (llama3).
    rope_original_max_position: "original_max_position_embeddings" (llama3).
    rotary_pct: fraction of head_dim that is rotated (GPT-NeoX partial rotary).
    parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX) vs. sequential.
    qkv_bias: biases on q/k/v projections (GPT-2, Qwen2, NeoX).
    out_bias: bias on the attention output projection (GPT-2, NeoX).
    mlp_bias: biases in the MLP (GPT-2, NeoX).
    tie_word_embeddings: lm head reuses the token embedding.
    sliding_window: Mistral-style local attention window (None = global).
    dtype: activation/compute dtype ("float32" or "bfloat16"); params stay float32.
    remat: rematerialise each block in the backward pass.
    bos_token_id / eos_token_id / pad_token_id: copied from / to the HF config.
    dropout: residual dropout rate, GPT-2/GPT-3 style (HF GPT-2 `embd_pdrop` and
      `resid_pdrop`): applied to the embedding output (token + learned position embeddings,
      before the first block) and, in every block, to the attention output (after the
      output projection) and to the MLP output (after the down projection), each before it
      is added to the residual stream. Never to the final norm or the heads.
    attention_dropout: dropout rate on the attention probabilities (after the softmax,
      before they weight the values; HF `attn_pdrop` / `attention_dropout`).
      Both rates act only in forward passes given a `dropout_rng` key (training steps);
      rollouts, scoring, evaluation and KV-cache sampling never pass one, so they are
      deterministic whatever the rates. The default 0 leaves the model unchanged.
  """

  family: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  intermediate_size: int = 128
  max_position_embeddings: int = 512
  norm_type: str = "rmsnorm"
  norm_eps: float = 1e-6
  activation: str = "silu"
  gated_mlp: bool = True
  position_type: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling_type: Optional[str] = None
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rotary_pct: float = 1.0
  parallel_residual: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: Optional[int] = None
  dtype: str = "float32"
  remat: bool = False
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  # Last, so positional construction of the older fields is unchanged.
  dropout: float = 0.0
  attention_dropout: float = 0.0

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r}: expected one of {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.norm_type not in ("layernorm", "rmsnorm"):
      raise ValueError(f"ModelConfig.norm_type={self.norm_type!r}: expected layernorm|rmsnorm")
    if self.position_type not in ("learned", "rope"):
      raise ValueError(f"ModelConfig.position_type={self.position_type!r}: expected learned|rope")
    if self.activation not in ("gelu_new", "gelu", "silu"):
      raise ValueError(f"ModelConfig.activation={self.activation!r}: expected gelu_new|gelu|silu")
    if self.rope_scaling_type not in (None, "linear", "llama3"):
      raise ValueError(f"ModelConfig.rope_scaling_type={self.rope_scaling_type!r}: expected "
                       "None|linear|llama3")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}: expected float32|bfloat16")
    for name in ("dropout", "attention_dropout"):
      rate = getattr(self, name)
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"ModelConfig.{name}={rate!r}: expected a rate in [0, 1)")

  @property
  def rotary_dim(self) -> int:
    """Number of rotated channels per head (even)."""
    return int(self.head_dim * self.rotary_pct) // 2 * 2

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig: unknown fields {unknown}")
    return cls(**d)
