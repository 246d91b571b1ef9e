"""Step 3: PPO and PPO-ptx against the reward model (InstructGPT §3.5, eq. 2).

One iteration = rollout (`sampling.generate`), experience (`ppo_experience`), then
`ppo.epochs` × `ppo.minibatches` updates as one jitted nested `lax.scan` of
`ppo_policy_loss + vf_coef · ppo_value_loss + ptx_coef · sft_loss(pretraining batch)`.
The value model starts from the reward model; the reference is the frozen SFT policy; the
KL coefficient is fixed or adaptive (Ziegler et al. 2019) and lives in the state.

    python launch/train.py --config=configs/ppo.py --workdir=runs/ppo --config.task= \
        --config.model.init_from=runs/sft --config.ppo.reward_from=runs/rm \
        --config.data.train.path=prompts.jsonl --config.data.ptx.path=pretrain.jsonl

The reward may also (or instead) be a Python function, `--config.ppo.reward_fn=file.py:name`,
scored on the host between the rollout and the experience (`ppo_rewards`); without a
reward model the value model starts from the policy with a fresh head. Every
`train.sample_every` iterations a few rows go to `samples.jsonl` (`samples_log`).

`load_models` + `build` give the `Parts` (state, jitted functions per prompt-length bucket)
that `iteration` runs; `train` adds the data, the host loop and the export (the policy, and
the value model to `export/value_model`). The benchmarks and the scale-out tests call
`build` and `iteration` with models of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, objectives, optim, reward_fns, sampling, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax import models as models_lib
from rlhf_jax.models import lora
from rlhf_jax.trainers import batching, loop, model_init
from rlhf_jax.trainers import ppo_experience as experience_lib
from rlhf_jax.trainers import ppo_rewards, ppo_setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers.model_init import Model

log = logging.getLogger("rlhf_jax")
VALUE_MODEL_EXPORT = "value_model"   # <workdir>/export/value_model (HF sequence classifier)


def make_update_fn(policy_cfg, value_cfg, ppo_cfg, policy_tx, value_tx, prompt_len: int,
                   use_ptx: bool, policy_lora=None, value_lora=None):
  """(state, experience, ptx_batch, rng, frozen=None) -> (state, metrics): epochs ×
  minibatch scans. With LoRA (`policy_lora` / `value_lora`: a `models.lora.Spec`), the
  state's policy / value are trainable trees and `frozen` = (policy base, value base)."""
  temperature = float(ppo_cfg.temperature)
  n_mb, epochs = int(ppo_cfg.minibatches), int(ppo_cfg.epochs)

  def loss_fn(trainable, mb, ptx_mb, frozen):
    policy, value = trainable
    if policy_lora is not None:
      policy = lora.full_params(policy_cfg, frozen[0], policy, policy_lora)
    if value_lora is not None:
      value = lora.full_params(value_cfg, frozen[1], value, value_lora)
    logp, entropy = objectives.response_logprobs(
        policy_cfg, policy, mb.input_ids, mb.attention_mask, prompt_len, temperature,
        with_entropy=True)
    pg_loss, pg_aux = losses.ppo_policy_loss(logp, mb.old_logprobs, mb.advantages,
                                             mb.response_mask, ppo_cfg.clip_eps)
    v = objectives.response_values(value_cfg, value, mb.input_ids, mb.attention_mask,
                                   prompt_len)
    v_loss, v_aux = losses.ppo_value_loss(v, mb.values, mb.returns, mb.response_mask,
                                          ppo_cfg.value_clip_eps)
    total = pg_loss + ppo_cfg.vf_coef * v_loss
    ptx_loss = jnp.zeros(())
    if use_ptx:
      ptx_loss, _ = objectives.lm_loss_and_count(policy_cfg, policy, ptx_mb)
      total = total + ppo_cfg.ptx_coef * ptx_loss
    metrics = dict(policy_loss=pg_loss, value_loss=v_loss, ptx_loss=ptx_loss,
                   policy_clip_frac=pg_aux["clip_frac"], value_clip_frac=v_aux["clip_frac"],
                   approx_kl=pg_aux["approx_kl"],
                   train_entropy=losses.masked_mean(entropy, mb.response_mask))
    return total, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch_step(carry, xs, frozen=None):
    policy, value, p_opt, v_opt = carry
    mb, ptx_mb = xs
    (loss, metrics), (g_policy, g_value) = grad_fn((policy, value), mb, ptx_mb, frozen)
    up, p_opt = policy_tx.update(g_policy, p_opt, policy)
    policy = jax.tree.map(jnp.add, policy, up)
    up, v_opt = value_tx.update(g_value, v_opt, value)
    value = jax.tree.map(jnp.add, value, up)
    finite = state_lib.all_finite(loss, g_policy, g_value)
    return (policy, value, p_opt, v_opt), dict(metrics, loss=loss, finite=finite)

  def update(state, exp, ptx_batch, rng, frozen=None):
    batch = exp.input_ids.shape[0]
    if use_ptx:  # [minibatches * ptx_batch, T] -> one pretraining slice per minibatch
      ptx_batch = jax.tree.map(lambda x: x.reshape((n_mb, -1) + x.shape[1:]), ptx_batch)

    def epoch(carry, key):
      perm = jax.random.permutation(key, batch)
      mbs = jax.tree.map(lambda x: x[perm].reshape((n_mb, -1) + x.shape[1:]), exp)
      return jax.lax.scan(functools.partial(minibatch_step, frozen=frozen), carry,
                          (mbs, ptx_batch))

    carry = (state["policy"], state["value"], state["policy_opt"], state["value_opt"])
    carry, metrics = jax.lax.scan(epoch, carry, jax.random.split(rng, epochs))
    policy, value, p_opt, v_opt = carry
    finite = jnp.all(metrics.pop("finite"))
    metrics = jax.tree.map(jnp.mean, metrics)
    new = dict(state, policy=policy, value=value, policy_opt=p_opt, value_opt=v_opt)
    if ppo_cfg.ema_decay > 0:
      d = ppo_cfg.ema_decay
      new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], policy)
    return state_lib.guarded(state, new, finite), metrics

  return update


def make_kl_update_fn(ppo_cfg, batch_size: int):
  """(state, observed KL) -> state with the KL controller stepped.

  Runs after the update: when that update was skipped as non-finite (the guard counted a
  consecutive skip) or the KL itself is not finite, β stays as it was, so one bad
  iteration can't turn β into NaN and every later update into a skip.
  """
  def fn(state, observed_kl):
    ctl = losses.KLControllerState(**state["kl_ctl"])
    new = losses.kl_controller_update(ctl, jnp.nan_to_num(observed_kl), batch_size)
    applied = (state["consecutive_skips"] == 0) & jnp.isfinite(observed_kl)
    kept = jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, ctl)
    return dict(state, kl_ctl=kept._asdict())
  return fn


@dataclasses.dataclass
class Models:
  """PPO's models: the SFT policy (the frozen reference and the trained copy's start), the
  value model and the reward model with its normalisation, and/or a reward function.

  The reward model is a compute-dtype copy (`model_init.frozen`); `build` makes the policy
  the float32 start of the trained copy and keeps a compute-dtype copy as the reference."""
  policy: Model
  value: Model
  reward: Optional[Model]     # None: the reward function alone scores
  normalization: dict
  eos_id: Optional[int]       # a response without it (or a stop id) gets `ppo.no_eos_penalty`
  pad_id: int
  stop_ids: tuple = ()        # the sampler stops a row at any of these (() = never)
  reward_fn: Optional[reward_fns.RewardFn] = None   # `ppo.reward_fn`, scored on the host
  tokenizer: Any = None       # decodes responses for the reward function and the samples

  def finish_ids(self):
    """What counts as a finished response in the experience: the stop ids, else EOS."""
    return list(self.stop_ids) if self.stop_ids else self.eos_id


def load_models(config, mesh, tokenizer, reward_fn=None) -> Models:
  """The policy (`model.init_from`), reward (`ppo.reward_from`, if any) and value
  (`ppo.value_from`, default the reward model, else the policy with a fresh head) models,
  placed on `mesh`, and the reward function (`ppo.reward_fn`, loaded here unless given)."""
  p = config.ppo
  if reward_fn is None and p.reward_fn:
    reward_fn = reward_fns.load(p.reward_fn)
  rules = state_lib.parse_rules(config.sharding_rules)
  policy_dir = workdir_lib.resolve_model_dir(config.model.init_from, "causal")
  value_from, value_field = _value_source(config)
  value_dir = workdir_lib.resolve_model_dir(value_from, "scalar", value_field)
  policy = model_init.initial_model(config, mesh, rules, "causal", config.model.init_from,
                                    tokenizer=tokenizer)
  reward, normalization = load_reward_model(config, mesh, rules, tokenizer)
  value = model_init.initial_model(config, mesh, rules, "scalar", value_from,
                                   tokenizer=tokenizer, seed_offset=1, field=value_field)
  if not value.fresh_head:   # started from a reward model: read in the rewards' units
    value = in_reward_units(value, workdir_lib.read_rm_normalization(value_dir))
  eos_id = tokenizer.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return Models(policy=policy, value=value, reward=reward, normalization=normalization,
                eos_id=eos_id, pad_id=pad_id,
                stop_ids=tuple(data.stop_ids(tokenizer, policy_dir)), reward_fn=reward_fn,
                tokenizer=tokenizer)


def load_reward_model(config, mesh, rules, tokenizer) -> tuple:
  """(the reward model `ppo.reward_from` as a frozen compute-dtype copy, its normalisation),
  or (None, no normalisation) without one. GRPO / RLOO / REINFORCE++ load it here too."""
  p = config.ppo
  if not p.reward_from:
    return None, dict(workdir_lib.NO_NORMALIZATION)
  reward_dir = workdir_lib.resolve_model_dir(p.reward_from, "scalar", "ppo.reward_from")
  reward = model_init.initial_model(config, mesh, rules, "scalar", p.reward_from,
                                    tokenizer=tokenizer, field="ppo.reward_from")
  reward = model_init.frozen(reward)   # only read: compute dtype, no optimiser state
  return reward, workdir_lib.read_rm_normalization(reward_dir)


def _value_source(config) -> tuple:
  """(where the value model starts, the field that named it): `ppo.value_from`, else the
  reward model (InstructGPT), else the policy (a reward function alone: a fresh head)."""
  p = config.ppo
  if p.value_from:
    return p.value_from, "ppo.value_from"
  if p.reward_from:
    return p.reward_from, "ppo.reward_from"
  return config.model.init_from, "model.init_from"


def in_reward_units(value: Model, normalization: dict) -> Model:
  """A value model started from a reward model, in the units PPO's rewards are in.

  InstructGPT initialises the value function from the RM. The rewards PPO sees are the
  normalised scores (r - mean) / scale, so the value head is rescaled the same way:
  kernel / scale and (bias - mean) / scale. At step 0, V at a response's last token then
  equals that response's normalised score; without it, V would be off by the bias (and the
  gain), and with γ = 1 every advantage would carry a position-dependent offset.
  """
  scale = normalization["std"] if normalization.get("gain") else 1.0
  head = value.params["head"]
  new_head = dict(head, kernel=head["kernel"] / scale,
                  bias=(head["bias"] - normalization["mean"]) / scale)
  new_head = jax.tree.map(lambda x, sh: jax.device_put(x, sh), new_head,
                          value.shardings["head"])
  return dataclasses.replace(value, params=dict(value.params, head=new_head))


@dataclasses.dataclass
class Parts:
  """What one PPO iteration runs: the models, the state and the jitted functions."""
  config: Any                 # the stage config (`ppo`, `train.batch_size`, `data`, `optim`)
  mesh: Any
  models: Models
  use_ptx: bool
  policy_tx: Any
  value_tx: Any
  shardings: dict
  init_state: Callable        # () -> fresh state pytree (born sharded)
  abstract_state: Callable    # () -> ShapeDtypeStructs with shardings (restore target)
  kl_fn: Callable             # jitted (state, observed KL) -> state
  response_buckets: tuple
  lora: Any = None            # models.lora.Spec of the policy (None: full fine-tuning) ...
  value_lora: Any = None      # ... and of the value model; their state trees are adapters
  _by_prompt_len: dict = dataclasses.field(default_factory=dict)
  _merge_fns: dict = dataclasses.field(default_factory=dict)

  def frozen(self):
    """The frozen bases the update merges the adapters into (None without LoRA)."""
    if self.lora is None and self.value_lora is None:
      return None
    return (self.models.policy.params if self.lora else None,
            self.models.value.params if self.value_lora else None)

  def policy_params(self, trainable):
    """The policy state["policy"] stands for (the merged model under LoRA)."""
    return self._merged("policy", self.lora, trainable)

  def value_params(self, trainable):
    return self._merged("value", self.value_lora, trainable)

  def _merged(self, name: str, spec, trainable):
    if spec is None:
      return trainable
    model = getattr(self.models, name)
    if name not in self._merge_fns:
      self._merge_fns[name] = jax.jit(
          lambda base, t: lora.changed_leaves(model.cfg, base, t, spec))
    return lora.with_leaves(model.params, self._merge_fns[name](model.params, trainable))

  def fns(self, prompt_len: int):
    """(experience fn, update fn) jitted for prompts of `prompt_len` tokens (one per bucket)."""
    if prompt_len not in self._by_prompt_len:
      m, p = self.models, self.config.ppo
      self._by_prompt_len[prompt_len] = (
          jax.jit(experience_lib.make_experience_fn(
              m.policy.cfg, m.value.cfg, m.reward.cfg if m.reward else None, p,
              m.normalization, m.finish_ids(), prompt_len)),
          jax.jit(make_update_fn(m.policy.cfg, m.value.cfg, p, self.policy_tx, self.value_tx,
                                 prompt_len, use_ptx=self.use_ptx, policy_lora=self.lora,
                                 value_lora=self.value_lora),
                  in_shardings=(self.shardings, None, None, None) + (
                      () if self.frozen() is None else (None,)),
                  out_shardings=(self.shardings, None), donate_argnums=(0,)))
    return self._by_prompt_len[prompt_len]


def build(config, mesh, models: Models, use_ptx: bool) -> Parts:
  """PPO's state (policy + value with their optimisers, the KL controller, EMA) and jitted
  functions over `mesh`."""
  p, B = config.ppo, config.train.batch_size
  batching.check_batch_split(mesh, B)
  if use_ptx:
    batching.check_batch_split(mesh, p.minibatches * p.ptx_batch_size,
                               "ppo.minibatches * ppo.ptx_batch_size")
  if B % p.minibatches:
    raise ConfigError("ppo.minibatches", p.minibatches, f"a divisor of train.batch_size={B}")
  updates = int(p.iterations) * p.epochs * p.minibatches
  policy_tx = optim.make_optimizer(config.optim, updates)
  value_tx = optim.make_optimizer(config.optim, updates, lr_scale=p.value_lr_scale)
  # The trained copy keeps the float32 master weights; the reference (`models.policy` from
  # here on) is a compute-dtype copy that is only read: no optimiser state, no float32 copy.
  dtypes = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(models.policy.params)}
  if dtypes != {"float32"}:   # e.g. the compute-dtype reference of an earlier `build`
    raise ValueError(f"ppo.build: models.policy holds {sorted(dtypes)} params; expected the "
                     "float32 master weights `load_models` gives, not a built reference")
  spec = lora.spec_from_config(config.model.get("lora"))
  value_spec = spec if spec is not None and p.get("value_lora", True) else None
  if spec is None:
    policy = jax.tree.map(_trained_copy, models.policy.params)
  models = dataclasses.replace(models, policy=model_init.frozen(models.policy))
  policy_shard, value, value_shard = models.policy.shardings, models.value.params, \
      models.value.shardings
  # LoRA: the state holds adapters only; the frozen base of the policy IS the reference
  # (one compute-dtype copy, read by both), and the value model's base is frozen alike.
  if spec is not None:
    policy, policy_shard = _lora_trainable(config, mesh, models.policy, spec, 0)
  if value_spec is not None:
    value, value_shard = _lora_trainable(config, mesh, models.value, value_spec, 1)
    models = dataclasses.replace(models, value=model_init.frozen(models.value))
  shardings, base_init, _ = state_lib.build(
      mesh, config.seed, {"policy": (policy, policy_shard, policy_tx),
                          "value": (value, value_shard, value_tx)})
  # A plain dict in the state (checkpoints as such); KLControllerState(**d) to update it.
  kl_init = losses.kl_controller_init(p.kl_controller, p.kl_coef, p.kl_target,
                                      p.kl_horizon)._asdict()
  shardings["kl_ctl"] = jax.tree.map(lambda _: sharding.replicated(mesh), kl_init)
  if p.ema_decay > 0:
    shardings["ema"] = models.policy.shardings

  def init_state():
    fresh = base_init()
    fresh["kl_ctl"] = jax.device_put(kl_init, shardings["kl_ctl"])
    if p.ema_decay > 0:
      fresh["ema"] = jax.tree.map(jnp.copy, fresh["policy"])
    return fresh

  def abstract_state():
    return state_lib.abstract_with_shardings(jax.eval_shape(init_state), shardings)

  kl_fn = jax.jit(make_kl_update_fn(p, B), donate_argnums=(0,),
                  in_shardings=(shardings, None), out_shardings=shardings)
  return Parts(config=config, mesh=mesh, models=models, use_ptx=use_ptx, policy_tx=policy_tx,
               value_tx=value_tx, shardings=shardings, init_state=init_state,
               abstract_state=abstract_state, kl_fn=kl_fn,
               response_buckets=batching.response_buckets(config, p.max_new_tokens),
               lora=spec, value_lora=value_spec)


def _lora_trainable(config, mesh, model: Model, spec, offset: int) -> tuple:
  """(LoRA trainable tree on the mesh, its shardings) for `model` (`models.lora`)."""
  kind = "scalar" if "head" in model.params else "causal"
  trainable, shard = state_lib.lora_trainable(
      mesh, model.cfg, model.params, spec, state_lib.parse_rules(config.sharding_rules),
      config.seed, offset)
  log.info("[ppo] LoRA rank %d on the %s: %d trained params", spec.rank,
           "value model" if kind == "scalar" else "policy", lora.count(model.cfg, spec, kind))
  return trainable, shard


def _trained_copy(x):
  """A fresh buffer for the trained policy (the state is donated; the reference stays);
  abstract params (the memory benchmark's) stay abstract."""
  return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x)


def rollout(parts: Parts, policy, batch, key):
  """Sampled responses to a global prompt batch, cut to the bucket of the longest one."""
  p, m = parts.config.ppo, parts.models
  out = sampling.generate(m.policy.cfg, policy, batch["input_ids"], batch["attention_mask"],
                          key, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                          eos_id=list(m.stop_ids) or None, pad_id=m.pad_id,
                          compact=p.rollout_compaction)
  return batching.cut_responses(out, parts.response_buckets)


def experience(parts: Parts, policy, value, kl_coef, batch, out, prompts=None):
  """The experience of a rollout: the reward function's scores (host), then the jitted
  experience. Returns (Experience, metrics, `ppo_rewards.Scored` or None)."""
  m = parts.models
  scored = None
  if m.reward_fn is not None:
    t = time.perf_counter()
    scored = ppo_rewards.function_scores(parts.mesh, m, batch, out, prompts)
    fn_time = time.perf_counter() - t
  exp_fn, _ = parts.fns(batch["input_ids"].shape[1])
  extra = () if scored is None else (scored.scores,)   # no reward fn: the call of old
  exp, exp_metrics = exp_fn(policy, m.policy.params, value,
                            m.reward.params if m.reward else None, kl_coef,
                            batch["input_ids"], batch["attention_mask"], out.tokens, out.mask,
                            *extra, **experience_lib.reused_logprobs(parts.config.ppo, out))
  if scored is not None:
    exp_metrics = dict(exp_metrics, time_reward_fn=fn_time)
  return exp, exp_metrics, scored


def iteration(parts: Parts, state, batch, ptx_batch, key, prompts=None, samples: int = 0):
  """One PPO iteration on a global prompt batch: rollout, experience, update, KL step.

  Args:
    batch: global `input_ids` / `attention_mask` [B, P] (left padded).
    ptx_batch: global pretraining batch [minibatches * ptx_batch_size, T], or None.
    key: this iteration's PRNG key (rollout and minibatch order).
    prompts: this process's prompt texts in row order, for a reward function and the
      samples (None: decoded from the tokens).
    samples: > 0 adds `metrics["samples"]`, this process's first `samples` rows
      (`ppo_rewards.sample_rows`), for the caller to pop.

  Returns:
    (state, metrics): the experience and update metrics and each phase's wall time
    (`time_score` includes the reward function's `time_reward_fn`).
  """
  p = parts.config.ppo
  t0 = time.perf_counter()
  gen_key, perm_key = jax.random.split(key)
  policy = parts.policy_params(state["policy"])   # merged once per rollout under LoRA
  out = rollout(parts, policy, batch, gen_key)
  jax.block_until_ready(out.tokens)
  t1 = time.perf_counter()
  _, update_fn = parts.fns(batch["input_ids"].shape[1])
  exp, metrics, scored = experience(parts, policy, parts.value_params(state["value"]),
                                    state["kl_ctl"]["kl_coef"], batch, out, prompts)
  del policy
  jax.block_until_ready(exp)
  t2 = time.perf_counter()
  rows = ppo_rewards.sample_rows(parts.models, batch, out, exp, samples, prompts, scored) \
      if samples > 0 else None
  if ptx_batch is None:
    ptx_batch = jnp.zeros((p.minibatches,))
  frozen = () if parts.frozen() is None else (parts.frozen(),)   # LoRA: the bases
  state, train_metrics = update_fn(state, exp, ptx_batch, perm_key, *frozen)
  state = parts.kl_fn(state, metrics["kl"])
  jax.block_until_ready(state["step"])
  t3 = time.perf_counter()
  metrics = dict(metrics, **train_metrics)
  metrics.update(time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                 tokens_per_sec=float(_generated(out.mask)) / max(t1 - t0, 1e-9))
  if rows is not None:
    metrics["samples"] = rows
  return state, metrics


@jax.jit
def _generated(mask):
  return jnp.sum(mask)


def exported_policy(parts: Parts, state):
  """The policy `train` exports: the EMA of the policy when `ppo.ema_decay` > 0."""
  return state["ema"] if parts.config.ppo.ema_decay > 0 else \
      parts.policy_params(state["policy"])


def evaluate(parts: Parts, state, batches, base_key, prompts=None) -> dict:
  """Mean score and KL to the reference of the exported policy's samples on global eval
  prompt batches; with an EMA, the raw policy's too (`raw_policy_score`, `raw_policy_kl`).
  With a reward function, its mean too (`fn_score`); `prompts` are this process's prompt
  texts of each batch (None: decoded from the tokens)."""
  batches = list(batches)
  prompts = list(prompts) if prompts is not None else [None] * len(batches)
  policies = {"": exported_policy(parts, state)}
  if parts.config.ppo.ema_decay > 0:
    policies["raw_policy_"] = state["policy"]
  zero_beta = jnp.zeros_like(state["kl_ctl"]["kl_coef"])   # same signature as training's β
  out_metrics = {}
  for prefix, policy in policies.items():
    means: dict = {"score": [], "kl": [], "fn_score": []}
    for i, batch in enumerate(batches):
      out = rollout(parts, policy, batch, jax.random.fold_in(base_key, 10**6 + i))
      _, m, _ = experience(parts, policy, parts.value_params(state["value"]), zero_beta, batch,
                           out, prompts[i])
      for key in means:
        if key in m:
          means[key].append(float(m[key]))
    out_metrics.update({f"{prefix}{k}": float(np.mean(v)) for k, v in means.items() if v})
  return out_metrics


def train(config, workdir: str) -> dict:
  """Runs PPO(-ptx) to completion; exports the policy (EMA when on) and the value model to
  `<workdir>/export`."""
  p, B = config.ppo, config.train.batch_size
  if not config.model.init_from:
    raise ConfigError("model.init_from", "", "the SFT policy (an HF dir or its stage workdir)")
  if not p.reward_from and not p.reward_fn:
    raise ConfigError("ppo.reward_from", "", "the reward model (an HF dir or its stage "
                      "workdir), or a Python reward function in ppo.reward_fn=file.py:name")
  # The user's code and optional packages fail here, before any model loads.
  reward_fn = reward_fns.load(p.reward_fn) if p.reward_fn else None
  if config.train.wandb:
    metrics_lib.import_wandb(config.train.wandb)
  mesh = model_init.make_mesh(config)
  tokenizer = model_init.load_tokenizer(
      config, workdir_lib.resolve_model_dir(config.model.init_from, "causal"))
  ppo_setup.check_tokenizers(config, tokenizer)
  prompts, eval_prompts, ptx = ppo_setup.load_data(config, tokenizer)
  parts = build(config, mesh, load_models(config, mesh, tokenizer, reward_fn),
                use_ptx=ptx is not None)
  if parts.models.reward is not None:
    ppo_setup.check_format(config, prompts, parts.models.normalization)
  # Prompts are left padded: cut to the prompt-length bucket of each batch; responses are
  # cut after the rollout to the bucket of the longest one (rows that stopped early). Each
  # row carries its index ("row", never cut) so the reward function and the samples get
  # the prompt text the dataset holds.
  prompt_bucketing = batching.length_bucketing(config, ("input_ids", "attention_mask"),
                                               side="left")
  prompt_it = batching.iterator(ppo_setup.with_rows(prompts), B, config.seed,
                                prompt_bucketing)
  ptx_it = batching.iterator(ptx.arrays, p.minibatches * p.ptx_batch_size, config.seed + 1) \
      if ptx is not None else None
  base_key = jax.random.PRNGKey(config.seed)
  logs = ppo_setup.RunLogs(config, workdir)

  def step(state, index):
    batch, texts = ppo_setup.split_rows(mesh, next(prompt_it), prompts.texts)
    ptx_batch = sharding.host_to_global(mesh, next(ptx_it)) if ptx_it is not None else None
    state, metrics = iteration(parts, state, batch, ptx_batch,
                               jax.random.fold_in(base_key, index), prompts=texts,
                               samples=logs.samples_due(index))
    logs.write_samples(index, metrics.pop("samples", None))
    metrics.update(ppo_setup.warn_bounds(index, float(metrics["kl"]), float(metrics["score"]),
                                         p))
    return state, metrics

  def run_eval(state):
    if eval_prompts is None:
      return {}
    split = [ppo_setup.split_rows(mesh, b, eval_prompts.texts)
             for b in batching.eval_batches(ppo_setup.with_rows(eval_prompts), B,
                                            config.train.eval_batches, prompt_bucketing)]
    return evaluate(parts, state, [b for b, _ in split], base_key,
                    prompts=[t for _, t in split])

  def finish(state):
    for name, out in export_models(parts, state, workdir, tokenizer).items():
      log.info("[ppo] exported %s to %s", name, out)

  m = parts.models
  loaded = {"policy": m.policy, "reward": m.reward, "value": m.value}
  loop.announce("ppo", mesh, {k: v for k, v in loaded.items() if v is not None},
                dict(rollout_batch=B, minibatches=p.minibatches, epochs=p.epochs,
                     prompt_len=config.data.max_prompt_len, new_tokens=p.max_new_tokens,
                     ptx_batch=p.ptx_batch_size if ptx else 0, iterations=int(p.iterations)))
  if m.reward_fn is not None:
    log.info("[ppo] reward: %s%s", f"{p.reward_fn_weight} * {m.reward_fn.spec}",
             f" + {p.reward_model_weight} * normalised RM score" if m.reward else "")
  stage = loop.Stage(name="ppo", total_steps=int(p.iterations), init_state=parts.init_state,
                     abstract_state=parts.abstract_state, step=step, evaluate=run_eval,
                     data_state=lambda: dict(prompts=prompt_it.state(),
                                             ptx=ptx_it.state() if ptx_it else None),
                     restore_data_state=lambda d: ppo_setup.restore_iters(d, prompt_it,
                                                                          ptx_it),
                     finish=finish)
  with logs, metrics_lib.attached(workdir, "ppo", [logs.wandb]):
    return loop.run(stage, workdir, config.train)


def _export_params(parts: Parts, name: str, state):
  """The params `export_models` writes for `name` ("policy": the EMA when on). Under LoRA
  with a compute-dtype (bfloat16) base, the float32 base is re-read from its HF dir on the
  host and merged there, so the export is W + s·A·B of the float32 weights."""
  spec = parts.lora if name == "policy" else parts.value_lora
  if spec is None:
    return exported_policy(parts, state) if name == "policy" else state["value"]
  model, trainable = getattr(parts.models, name), state[name]
  if all(jnp.dtype(x.dtype) == jnp.float32 for x in jax.tree.leaves(model.params)):
    return getattr(parts, f"{name}_params")(trainable)
  kind = "causal" if name == "policy" else "scalar"
  source = parts.config.model.init_from if name == "policy" else _value_source(parts.config)[0]
  _, host = models_lib.load_hf(workdir_lib.resolve_model_dir(source, kind))
  return lora.full_params(model.cfg, host, workdir_lib.host_copy(trainable), spec, xp=np)


def export_models(parts: Parts, state, workdir: str, tokenizer) -> dict:
  """Writes the exported policy (`export/policy`) and the value model (`export/value_model`)
  in HF format; returns name -> directory.

  The value model is an HF sequence classifier whose score at a sequence's last token is
  V in reward units. HF's `score` layer has no bias, so (as for a reward model) the head's
  bias is folded into `reward_normalization.json` as `mean = -bias`: transformers' score
  minus that mean is our value, and `ppo.value_from=<that dir>` restores it exactly.
  """
  m = parts.models
  value = _export_params(parts, "value", state)
  value = dict(value, head=dict(value["head"]))
  bias = float(np.asarray(workdir_lib.host_copy(value["head"]["bias"])).reshape(-1)[0])
  value["head"]["bias"] = jnp.zeros_like(value["head"]["bias"])
  out = {}
  if parts.lora is not None and parts.config.model.lora.export_adapter:
    out["LoRA adapter (PEFT)"] = workdir_lib.export_adapter(
        workdir, m.policy.cfg, state["policy"]["adapters"], parts.lora,
        workdir_lib.resolve_model_dir(parts.config.model.init_from, "causal"))
  return {
      **out,
      "policy": workdir_lib.export(workdir, m.policy.cfg,
                                   _export_params(parts, "policy", state),
                                   tokenizer, "causal"),
      "value model": workdir_lib.export(
          workdir, m.value.cfg, value, tokenizer, "scalar", name=VALUE_MODEL_EXPORT,
          normalization=dict(mean=-bias, std=1.0, gain=False, n=0)),
  }
