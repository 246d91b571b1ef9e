"""Named architectures: the shapes of common public checkpoints plus a `tiny` test model.

Presets give shapes for random-init runs and benchmarks; to use real weights, `load_hf`
reads the config from the checkpoint instead.
"""

from __future__ import annotations

from rlhf_jax.models.config import ModelConfig

_GPT2 = dict(family="gpt2", norm_type="layernorm", norm_eps=1e-5, activation="gelu_new",
             gated_mlp=False, position_type="learned", qkv_bias=True, out_bias=True,
             mlp_bias=True, tie_word_embeddings=True, vocab_size=50257,
             max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256)

_LLAMA3 = dict(family="llama", norm_type="rmsnorm", norm_eps=1e-5, activation="silu",
               gated_mlp=True, position_type="rope", vocab_size=128256,
               max_position_embeddings=131072, rope_theta=500000.0,
               rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_position=8192,
               bos_token_id=128000, eos_token_id=128001)

PRESETS: dict[str, ModelConfig] = {
    # A llama-shaped toy for tests and the `:tiny` smoke-test configs.
    "tiny": ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                        max_position_embeddings=512, norm_type="rmsnorm", norm_eps=1e-6,
                        activation="silu", gated_mlp=True, position_type="rope"),
    # The embedded default task's model: 4 blocks are what it takes for the reward model to
    # check answers against the prompt; still ~65 ms per 64x40-token train step on 2 cores.
    "small": ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                         max_position_embeddings=512, norm_type="rmsnorm", norm_eps=1e-6,
                         activation="silu", gated_mlp=True, position_type="rope"),
    "gpt2": ModelConfig(**_GPT2, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                        head_dim=64, intermediate_size=3072),
    "gpt2-medium": ModelConfig(**_GPT2, hidden_size=1024, num_layers=24, num_heads=16,
                               num_kv_heads=16, head_dim=64, intermediate_size=4096),
    "pythia-160m": ModelConfig(family="gpt_neox", vocab_size=50304, hidden_size=768,
                               num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                               intermediate_size=3072, max_position_embeddings=2048,
                               norm_type="layernorm", norm_eps=1e-5, activation="gelu",
                               gated_mlp=False, position_type="rope", rope_theta=10000.0,
                               rotary_pct=0.25, parallel_residual=True, qkv_bias=True,
                               out_bias=True, mlp_bias=True, tie_word_embeddings=False,
                               bos_token_id=0, eos_token_id=0),
    "qwen2-0.5b": ModelConfig(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24,
                              num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                              max_position_embeddings=32768, norm_type="rmsnorm", norm_eps=1e-6,
                              activation="silu", gated_mlp=True, position_type="rope",
                              rope_theta=1000000.0, qkv_bias=True, tie_word_embeddings=True,
                              bos_token_id=151643, eos_token_id=151643),
    # Llama-3.2-1B: tied embeddings, llama3 RoPE scaling with factor 32.
    "llama-1b": ModelConfig(**{**_LLAMA3, "rope_scaling_factor": 32.0}, hidden_size=2048,
                            num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                            intermediate_size=8192, tie_word_embeddings=True),
    # Llama-3.1-8B / 70B.
    "llama-8b": ModelConfig(**_LLAMA3, hidden_size=4096, num_layers=32, num_heads=32,
                            num_kv_heads=8, head_dim=128, intermediate_size=14336),
    "llama-70b": ModelConfig(**_LLAMA3, hidden_size=8192, num_layers=80, num_heads=64,
                             num_kv_heads=8, head_dim=128, intermediate_size=28672),
    # Mistral-7B-v0.1 (sliding window 4096).
    "mistral-7b": ModelConfig(family="mistral", vocab_size=32000, hidden_size=4096,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              intermediate_size=14336, max_position_embeddings=32768,
                              norm_type="rmsnorm", norm_eps=1e-5, activation="silu",
                              gated_mlp=True, position_type="rope", rope_theta=10000.0,
                              sliding_window=4096, bos_token_id=1, eos_token_id=2),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """The named config, optionally with fields replaced (e.g. dtype="bfloat16").

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  cfg = PRESETS[name]
  return cfg.replace(**overrides) if overrides else cfg
