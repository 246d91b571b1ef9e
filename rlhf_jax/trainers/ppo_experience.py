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
function's scores. With `ppo.old_logprobs="sampler"` the old log-probs are the rollout's own
(`reused_logprobs`) and the policy's forward is skipped.
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
  response_mask, fn_scores=None, sampler_logprobs=None) -> (Experience, metrics).

  `eos_id` is the stop id, or a list of them (`data.stop_ids`): a response without any of
  them among its valid tokens gets `ppo_cfg.no_eos_penalty`. `reward_cfg` None means no
  reward model (`reward` is then ignored). `fn_scores` [B] are a reward function's scores
  (`ppo.reward_fn`): the score is `ppo_cfg.reward_model_weight` × the normalised RM score
  plus `ppo_cfg.reward_fn_weight` × these. `sampler_logprobs` [B, N] (`reused_logprobs`)
  stand in for the policy's forward as the old log-probs.
  """
  temperature = float(ppo_cfg.temperature)
  stops = stop_array(eos_id)

  def fn(policy, ref, value, reward, kl_coef, prompt_ids, prompt_mask, tokens, response_mask,
         fn_scores=None, sampler_logprobs=None):
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    rmask = response_mask.astype(jnp.float32)
    old_logp, entropy = old_logprobs(policy_cfg, policy, ids, mask, prompt_len, temperature,
                                     rmask, sampler_logprobs)
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


def reused_logprobs(ppo_cfg, out) -> dict:
  """The experience function's keyword arguments for `ppo.old_logprobs`.

  "sampler": `sampler_logprobs=` the rollout's per-token log-probs (`GenerateOutput.logprobs`,
  float32 log-softmax(logits / temperature) of each drawn token: PPO refuses top-k / top-p,
  so that is the unfiltered distribution the ratio needs). "score": nothing, so the call and
  its compilation are the ones from before the option existed.
  """
  if ppo_cfg.get("old_logprobs", "score") != "sampler":
    return {}
  return dict(sampler_logprobs=out.logprobs)


def old_logprobs(policy_cfg, policy, ids, mask, prompt_len: int, temperature: float, rmask,
                 sampler_logprobs=None):
  """(log π_old [B, N], per-token entropy [B, N]): the policy's forward over the rollout, or,
  given `sampler_logprobs`, those (zeroed off the response mask) with no forward at all.

  The reused log-probs come from the KV-cache decode path: the same numbers up to float32
  rounding in float32, up to ~0.02 nats a token apart in bfloat16. Without the forward there
  is no full distribution to take the entropy of; on-policy, E_y~π[−log π(y)] is the
  entropy, so −log π of each sampled token is an unbiased (noisier) per-token estimate and
  its masked mean is logged under the same `entropy` key.
  """
  if sampler_logprobs is None:
    return objectives.response_logprobs(policy_cfg, policy, ids, mask, prompt_len,
                                        temperature, with_entropy=True)
  logp = sampler_logprobs.astype(jnp.float32) * rmask
  return logp, -logp


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
