"""Step 3, first half: turning sampled responses into PPO experience.

For prompts x (left padded, length P) and sampled responses y (right padded, length N):
  old log-probs   log π_old(y_t | x, y_<t)   (policy, logits / temperature)
  ref log-probs   log π_SFT(y_t | ...)       (frozen SFT model, same temperature)
  values          V(x, y_<t)                 (value model, read before each response token)
  score           w_rm · r_θ(x, y) (the RM read at the last response token, normalised)
                  + w_fn · f(x, y) (a Python reward function's scores, computed on the host
                  and passed in); minus a penalty when the response never emitted a stop id
                  (EOS or the chat end-of-turn). Either term may be absent.
  rewards         −β·KL per token + score at the last token   (InstructGPT eq. 2)
  advantages      GAE(γ, λ), whitened over valid tokens; returns = advantages + values
All of it is one jitted function of the models' params, the sampled tokens and the
function's scores.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import losses, objectives


class Experience(NamedTuple):
  input_ids: jax.Array       # [B, P+N] prompt + response
  attention_mask: jax.Array  # [B, P+N]
  response_mask: jax.Array   # [B, N]
  old_logprobs: jax.Array    # [B, N]
  ref_logprobs: jax.Array    # [B, N]
  values: jax.Array          # [B, N]
  advantages: jax.Array      # [B, N]
  returns: jax.Array         # [B, N]
  scores: jax.Array          # [B] the score each response earned (its last-token reward)
  kls: jax.Array             # [B] Σ_t log π_old / π_SFT over its tokens


def make_experience_fn(policy_cfg, value_cfg, reward_cfg, ppo_cfg, normalization: dict,
                       eos_id, prompt_len: int):
  """Returns f(policy, ref, value, reward, kl_coef, prompt_ids, prompt_mask, tokens,
  response_mask, fn_scores=None) -> (Experience, metrics).

  `eos_id` is the stop id, or a list of them (`data.stop_ids`): a response without any of
  them among its valid tokens gets `ppo_cfg.no_eos_penalty`. `reward_cfg` None means no
  reward model (`reward` is then ignored). `fn_scores` [B] are a reward function's scores
  (`ppo.reward_fn`): the score is `ppo_cfg.reward_model_weight` × the normalised RM score
  plus `ppo_cfg.reward_fn_weight` × these.
  """
  temperature = float(ppo_cfg.temperature)
  stops = stop_array(eos_id)

  def fn(policy, ref, value, reward, kl_coef, prompt_ids, prompt_mask, tokens, response_mask,
         fn_scores=None):
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    rmask = response_mask.astype(jnp.float32)
    old_logp, entropy = objectives.response_logprobs(policy_cfg, policy, ids, mask, prompt_len,
                                                     temperature, with_entropy=True)
    ref_logp = objectives.response_logprobs(policy_cfg, ref, ids, mask, prompt_len, temperature)
    values = objectives.response_values(value_cfg, value, ids, mask, prompt_len) * rmask
    score, has_eos, length, reward_metrics = response_scores(
        reward_cfg, reward, ids, mask, tokens, response_mask, prompt_len, normalization,
        stops, ppo_cfg, fn_scores)
    rewards = losses.kl_penalized_rewards(score, old_logp, ref_logp, rmask, kl_coef,
                                          kind=ppo_cfg.kl_kind)
    advantages, returns = losses.gae(rewards, values, rmask, ppo_cfg.gamma, ppo_cfg.lam)
    if ppo_cfg.whiten_advantages:
      advantages = losses.whiten(advantages, rmask)
    kl_tok = losses.kl_penalty(old_logp, ref_logp, kind="k1") * rmask
    kl_seq = jnp.sum(kl_tok, axis=1)
    exp = Experience(ids, mask, rmask, old_logp, ref_logp, values, advantages * rmask,
                     returns * rmask, score, kl_seq)
    var_r = losses.masked_mean(jnp.square(returns - losses.masked_mean(returns, rmask)), rmask)
    var_res = losses.masked_mean(jnp.square(returns - values - losses.masked_mean(
        returns - values, rmask)), rmask)
    metrics = dict(
        reward_metrics, score=jnp.mean(score), kl=jnp.mean(kl_seq),
        kl_coef=kl_coef, entropy=losses.masked_mean(entropy, rmask),
        response_length=jnp.mean(length.astype(jnp.float32)),
        no_eos_frac=1.0 - jnp.mean(has_eos.astype(jnp.float32)),
        reward_total=jnp.mean(jnp.sum(rewards, axis=1)),
        explained_variance=1.0 - var_res / jnp.maximum(var_r, 1e-8),
        value_mean=losses.masked_mean(values, rmask))
    return exp, metrics

  return fn


def stop_array(eos_id) -> jax.Array:
  """The stop id(s) as an int32 array: a response "finished" when it holds any of them (EOS,
  or a chat template's end of turn)."""
  return jnp.asarray(list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id],
                     jnp.int32)


def response_scores(reward_cfg, reward, ids, mask, tokens, response_mask, prompt_len: int,
                    normalization: dict, stops, ppo_cfg, fn_scores=None):
  """Each response's score (the module docstring's `score`), shared with GRPO's rollout.

  Returns (score [B], has_eos [B], length [B] int32, reward metrics).
  """
  rm_weight, fn_weight = float(ppo_cfg.reward_model_weight), float(ppo_cfg.reward_fn_weight)
  length = jnp.sum(response_mask, axis=1).astype(jnp.int32)
  last = prompt_len - 1 + length   # the last response token (the prompt's end if empty)
  reward_metrics = {}
  score = jnp.zeros(ids.shape[:1], jnp.float32)
  if reward_cfg is not None:
    rm_score, raw = objectives.normalized_scores(reward_cfg, reward, ids, mask, last,
                                                 normalization)
    # × 1.0 is exact: an RM-only run's score is the normalised RM score, bit for bit.
    score = score + rm_weight * rm_score
    reward_metrics.update(raw_score=jnp.mean(raw), rm_score=jnp.mean(rm_score))
  if fn_scores is not None:
    fn_scores = fn_scores.astype(jnp.float32)
    score = score + fn_weight * fn_scores
    reward_metrics["fn_score"] = jnp.mean(fn_scores)
  if reward_cfg is None and fn_scores is None:
    raise ValueError("make_experience_fn: no reward model (reward_cfg) and no fn_scores")
  has_eos = jnp.any(jnp.isin(tokens, stops) & (response_mask > 0), axis=1)
  score = jnp.where(has_eos, score, score - ppo_cfg.no_eos_penalty)
  return score, has_eos, length, reward_metrics
