r"""The per-device memory arithmetic of docs/scaling.md, computed (not guessed).

Param counts come from the presets' abstract params (`models.abstract_params`, no
allocation); the byte counts follow the formulas in docs/scaling.md:

  params (fp32 master)   4 · N / (fsdp · tensor)
  Adam moments (fp32)    8 · N / (fsdp · tensor)
  gradients (fp32)       4 · N / (fsdp · tensor)
  frozen model (fp32)    4 · N / (fsdp · tensor)       (reference policy, reward model)
  activations            see `activation_bytes`
  KV cache               2 · L · B · S · K · H · bytes / (data · fsdp · tensor)

  .venv/bin/python bench/memory_arithmetic.py     # prints the tables of docs/scaling.md
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rlhf_jax import models  # noqa: E402

GB = 1e9
HBM = {"H100 80GB": 80e9, "TPU v5p (95 GB)": 95e9}


def params(preset: str, kind: str = "causal") -> int:
  return models.param_count(models.abstract_params(models.get_preset(preset), kind))


def activation_bytes(cfg, batch_per_device: int, seq: int, tensor: int, remat: bool,
                     dtype_bytes: int = 2) -> int:
  """Saved activations of a train step's forward pass, per device (an estimate).

  Without remat each layer keeps, per token: the two normed inputs and the residual (3 D),
  q / k / v and the attention output (2 n·H + 2 K·H), the gate, up and gated MLP tensors
  (3 F) in the compute dtype, plus the attention logits (float32) and probabilities
  (compute dtype) of n·T entries (no flash attention). With per-block remat only each
  block's input (D) is kept, plus one block's full set while it is recomputed. Head and
  MLP dims are split over `tensor`; the final logits [B, T, V] in float32 (twice: logits
  and log-softmax) are split over `tensor` by the vocab rule.
  """
  d, f, n, k, h, L, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, cfg.vocab_size)
  tokens = batch_per_device * seq
  per_token_layer = dtype_bytes * (3 * d + (2 * n * h + 2 * k * h + 3 * f) / tensor)
  attn_scores = batch_per_device * (n / tensor) * seq * seq * (4 + dtype_bytes)
  layer = tokens * per_token_layer + attn_scores
  logits = 2 * tokens * (v / tensor) * 4
  if remat:
    return int(L * tokens * d * dtype_bytes + layer + logits)
  return int(L * layer + logits)


def kv_cache_bytes(cfg, batch: int, seq: int, batch_shards: int, tensor: int,
                   dtype_bytes: int = 2) -> int:
  """2 · L · B · S · K · H · bytes, batch over data·fsdp and kv heads over tensor."""
  kv_split = tensor if cfg.num_kv_heads % tensor == 0 else 1
  return int(2 * cfg.num_layers * batch * seq * cfg.num_kv_heads * cfg.head_dim *
             dtype_bytes / batch_shards / kv_split)


def fmt(b: float) -> str:
  return f"{b / GB:.1f}"


def main():
  print("## Param counts (from the presets)\n")
  print("| preset | params | fp32 weights | params + Adam + grads (16 B/param) |")
  print("|---|---|---|---|")
  counts = {}
  for preset in ("llama-1b", "llama-8b", "llama-70b"):
    n = params(preset)
    counts[preset] = n
    print(f"| {preset} | {n / 1e9:.3f} B | {fmt(4 * n)} GB | {fmt(16 * n)} GB |")
  ns = {p: params(p, "scalar") for p in counts}

  print("\n## SFT / RM: per-device bytes of the train state (params + Adam + grads)\n")
  print("| model | mesh (data, fsdp, tensor) | devices | state / device | "
        "activations, B/dev=1 T=2048 bf16, no remat | with remat |")
  print("|---|---|---|---|---|---|")
  plans = [("llama-1b", (8, 1, 1)), ("llama-1b", (1, 8, 1)),
           ("llama-8b", (1, 8, 1)), ("llama-8b", (2, 8, 1)), ("llama-8b", (1, 4, 2)),
           ("llama-70b", (1, 32, 1)), ("llama-70b", (1, 64, 1)), ("llama-70b", (2, 32, 4))]
  for preset, (dp, fsdp, tp) in plans:
    cfg = models.get_preset(preset)
    n = counts[preset]
    state = 16 * n / (fsdp * tp)
    act = activation_bytes(cfg, 1, 2048, tp, remat=False)
    act_r = activation_bytes(cfg, 1, 2048, tp, remat=True)
    print(f"| {preset} | ({dp}, {fsdp}, {tp}) | {dp * fsdp * tp} | {fmt(state)} GB | "
          f"{fmt(act)} GB | {fmt(act_r)} GB |")

  print("\n## PPO: policy + value trained, reference + reward frozen (fp32)\n")
  print("| policy | reward / value | mesh (data, fsdp, tensor) | devices | "
        "policy 16N | value 16N | ref 4N | reward 4N | total / device | "
        "KV cache (B=512, S=1024 bf16) / device |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  ppo_plans = [("llama-1b", "llama-1b", (1, 8, 1)),
               ("llama-8b", "llama-8b", (1, 16, 1)), ("llama-8b", "llama-1b", (1, 8, 1)),
               ("llama-70b", "llama-70b", (1, 64, 2)), ("llama-70b", "llama-8b", (1, 64, 1))]
  for pol, rew, (dp, fsdp, tp) in ppo_plans:
    s = fsdp * tp
    np_, nr = counts[pol], ns[rew]
    parts = [16 * np_ / s, 16 * nr / s, 4 * np_ / s, 4 * nr / s]
    kv = kv_cache_bytes(models.get_preset(pol), 512, 1024, dp * fsdp, tp)
    print(f"| {pol} | {rew} | ({dp}, {fsdp}, {tp}) | {dp * fsdp * tp} | " +
          " | ".join(f"{fmt(p)} GB" for p in parts) + f" | **{fmt(sum(parts))} GB** | "
          f"{fmt(kv)} GB |")

  print("\n## KV cache of one rollout batch (2·L·B·S·K·H·2 bytes, bf16, unsharded)\n")
  print("| policy | L | K·H | B=64, S=1024 | B=512, S=1024 | B=512, S=4096 |")
  print("|---|---|---|---|---|---|")
  for preset in counts:
    cfg = models.get_preset(preset)
    row = [kv_cache_bytes(cfg, b, s, 1, 1) for b, s in ((64, 1024), (512, 1024), (512, 4096))]
    print(f"| {preset} | {cfg.num_layers} | {cfg.num_kv_heads}·{cfg.head_dim} | " +
          " | ".join(f"{fmt(r)} GB" for r in row) + " |")


if __name__ == "__main__":
  main()
