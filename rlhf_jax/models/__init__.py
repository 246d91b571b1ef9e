"""Decoder-only transformers (GPT-2, Llama, Qwen2, Mistral, GPT-NeoX) and HF interop.

The NNX modules live in `transformer.py`; everything else in the project talks to
models through the pure functions re-exported here (see docs/internals.md).
"""

from rlhf_jax.models.config import FAMILIES, ModelConfig
from rlhf_jax.models.api import (abstract_params, causal_to_scalar, forward_with_cache,
                                 head_values, hidden_states, init, init_cache, kind_of,
                                 logical_axes, logits, param_count, positions_from_mask, scores,
                                 unembedding, values)
from rlhf_jax.models.presets import PRESETS, get_preset
from rlhf_jax.models.hf import load_hf, save_hf
from rlhf_jax.models.hf_sharded import load_hf_sharded

__all__ = [
    "FAMILIES", "ModelConfig", "PRESETS", "abstract_params", "causal_to_scalar",
    "forward_with_cache", "get_preset", "head_values", "hidden_states", "init", "init_cache",
    "kind_of", "load_hf", "load_hf_sharded", "logical_axes", "logits", "param_count", "positions_from_mask",
    "save_hf", "scores", "unembedding", "values",
]
