"""Objectives that need a model: token log-probs, values, reward scores and the LM loss.

`rlhf_jax.losses` is array-only; the functions here run a model (`rlhf_jax.models`) and hand
its outputs to those losses. The trainers, the built-in pipeline's evaluation and the
benchmarks all call these, so every pass reads a model the same way:

- positions that predict response tokens are sliced from the final hidden states BEFORE the
  [D, V] unembedding / the value head, so neither the prompt positions' share of the head's
  FLOPs nor a [B, P+N, V] float32 logits array is computed (XLA does not push a slice of the
  logits back through the matmul);
- log-probs are of softmax(logits / temperature): the distribution the sampler draws from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import losses, models


def response_logprobs(cfg, params, input_ids, attention_mask, prompt_len: int,
                      temperature: float, with_entropy: bool = False):
  """log π(y_t | x, y_<t) of each response token, and optionally the entropy: [B, N].

  Args:
    cfg, params: a causal model.
    input_ids, attention_mask: [B, P+N] prompt (left padded, length P) + response.
    prompt_len: P (static).
    temperature: logits are divided by it (as in `sampling.generate`).
    with_entropy: also return the entropy of each position's distribution.
  """
  hidden = models.hidden_states(cfg, params, input_ids, attention_mask)[:, prompt_len - 1:-1]
  logits = jnp.einsum("BTD,DV->BTV", hidden, models.unembedding(cfg, params),
                      preferred_element_type=jnp.float32) / temperature
  targets = input_ids[:, prompt_len:]
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  if not with_entropy:
    return logp
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def response_values(cfg, params, input_ids, attention_mask, prompt_len: int):
  """V(s_t): a scalar model's head read at the position before each response token: [B, N].

  The hidden states are sliced before the head (docs/benchmarks.md compares both orders).
  """
  hidden = models.hidden_states(cfg, params, input_ids, attention_mask)[:, prompt_len - 1:-1]
  return models.head_values(cfg, params, hidden)


def normalized_scores(cfg, params, input_ids, attention_mask, last_index, normalization: dict):
  """The reward model's score read at `last_index` [B], normalised: (r - mean) [/ std].

  `normalization` is what the RM stage measured on demonstrations (InstructGPT §3.5: a bias
  so that demonstrations score 0 on average; with `gain`, unit std as in Ziegler et al.
  2019) and saved beside its export (`workdir.read_rm_normalization`).
  """
  raw = models.scores(cfg, params, input_ids, attention_mask, last_index)
  scale = normalization["std"] if normalization.get("gain") else 1.0
  return (raw - normalization["mean"]) / scale, raw


def ranked_rewards(cfg, params, batch, dropout_rng=None):
  """Raw scalar rewards [B, K] of K responses per prompt, each read at its `last_index`.

  `dropout_rng`: a training step's key (dropout at `cfg`'s rates); None = deterministic.
  """
  b, k, t = batch["input_ids"].shape
  flat = lambda x: x.reshape((b * k,) + x.shape[2:])  # noqa: E731
  r = models.scores(cfg, params, flat(batch["input_ids"]), flat(batch["attention_mask"]),
                    flat(batch["last_index"]), dropout_rng=dropout_rng)
  return r.reshape(b, k)


def lm_loss_and_count(cfg, params, batch, dropout_rng=None):
  """Masked next-token NLL (mean over loss tokens) and the number of loss tokens.

  `batch` holds input_ids / attention_mask / loss_mask [B, T]. The loss is taken from the
  final hidden states chunk by chunk (`losses.sft_loss_from_hidden`), so no [B, T, V]
  float32 logits are ever held. `dropout_rng` as in `ranked_rewards`.
  """
  hidden = models.hidden_states(cfg, params, batch["input_ids"], batch["attention_mask"],
                                dropout_rng=dropout_rng)
  targets = batch["input_ids"][:, 1:]
  mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
  loss = losses.sft_loss_from_hidden(hidden[:, :-1], models.unembedding(cfg, params),
                                     targets, mask)
  return loss, jnp.sum(mask)


def dropout_keys(cfg, rng, step, n: int):
  """One dropout key per microbatch of a training step, or None when `cfg` has no dropout.

  Derived from the state's rng and step, so a resumed run draws the same masks. Only SFT
  and reward-model steps use them: rollouts, scoring, evaluation and PPO's updates (whose
  ratios and KL compare with dropout-free rollouts) pass none.
  """
  if not (cfg.dropout > 0 or cfg.attention_dropout > 0):
    return None
  return jax.random.split(jax.random.fold_in(rng, step), n)
