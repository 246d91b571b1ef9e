"""Step 3: PPO and PPO-ptx against the reward model (InstructGPT §3.5, eq. 2).

One iteration = rollout (`sampling.generate`), experience (`ppo_experience`), then
`ppo.epochs` × `ppo.minibatches` updates as one jitted nested `lax.scan` of
`ppo_policy_loss + vf_coef · ppo_value_loss + ptx_coef · sft_loss(pretraining batch)`.
The value model starts from the reward model; the reference is the frozen SFT policy; the
KL coefficient is fixed or adaptive (Ziegler et al. 2019) and lives in the state.

    python launch/train.py --config=configs/ppo.py --workdir=runs/ppo --config.task= \
        --config.model.init_from=runs/sft --config.ppo.reward_from=runs/rm \
        --config.data.train.path=prompts.jsonl --config.data.ptx.path=pretrain.jsonl
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import losses, models, optim, sampling, sharding
from rlhf_jax.trainers import batching, loop, setup
from rlhf_jax.trainers import ppo_experience as experience_lib
from rlhf_jax.trainers import state as state_lib

log = logging.getLogger("rlhf_jax")


def make_update_fn(policy_cfg, value_cfg, ppo_cfg, policy_tx, value_tx, prompt_len: int,
                   use_ptx: bool):
  """(state, experience, ptx_batch, rng) -> (state, metrics): epochs × minibatch scans."""
  temperature = float(ppo_cfg.temperature)
  n_mb, epochs = int(ppo_cfg.minibatches), int(ppo_cfg.epochs)

  def loss_fn(trainable, mb, ptx_mb):
    policy, value = trainable
    logp, entropy = experience_lib.response_logprobs(
        policy_cfg, policy, mb.input_ids, mb.attention_mask, prompt_len, temperature,
        with_entropy=True)
    pg_loss, pg_aux = losses.ppo_policy_loss(logp, mb.old_logprobs, mb.advantages,
                                             mb.response_mask, ppo_cfg.clip_eps)
    v = experience_lib.response_values(value_cfg, value, mb.input_ids, mb.attention_mask,
                                       prompt_len)
    v_loss, v_aux = losses.ppo_value_loss(v, mb.values, mb.returns, mb.response_mask,
                                          ppo_cfg.value_clip_eps)
    total = pg_loss + ppo_cfg.vf_coef * v_loss
    ptx_loss = jnp.zeros(())
    if use_ptx:
      hidden = models.hidden_states(policy_cfg, policy, ptx_mb["input_ids"],
                                    ptx_mb["attention_mask"])
      ptx_loss = losses.sft_loss_from_hidden(
          hidden[:, :-1], models.unembedding(policy_cfg, policy), ptx_mb["input_ids"][:, 1:],
          ptx_mb["loss_mask"][:, 1:] * ptx_mb["attention_mask"][:, 1:])
      total = total + ppo_cfg.ptx_coef * ptx_loss
    metrics = dict(policy_loss=pg_loss, value_loss=v_loss, ptx_loss=ptx_loss,
                   policy_clip_frac=pg_aux["clip_frac"], value_clip_frac=v_aux["clip_frac"],
                   approx_kl=pg_aux["approx_kl"],
                   train_entropy=losses.masked_mean(entropy, mb.response_mask))
    return total, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch_step(carry, xs):
    policy, value, p_opt, v_opt = carry
    mb, ptx_mb = xs
    (loss, metrics), (g_policy, g_value) = grad_fn((policy, value), mb, ptx_mb)
    up, p_opt = policy_tx.update(g_policy, p_opt, policy)
    policy = jax.tree.map(jnp.add, policy, up)
    up, v_opt = value_tx.update(g_value, v_opt, value)
    value = jax.tree.map(jnp.add, value, up)
    finite = state_lib.all_finite(loss, g_policy, g_value)
    return (policy, value, p_opt, v_opt), dict(metrics, loss=loss, finite=finite)

  def update(state, exp, ptx_batch, rng):
    batch = exp.input_ids.shape[0]
    if use_ptx:  # [minibatches * ptx_batch, T] -> one pretraining slice per minibatch
      ptx_batch = jax.tree.map(lambda x: x.reshape((n_mb, -1) + x.shape[1:]), ptx_batch)

    def epoch(carry, key):
      perm = jax.random.permutation(key, batch)
      mbs = jax.tree.map(lambda x: x[perm].reshape((n_mb, -1) + x.shape[1:]), exp)
      return jax.lax.scan(minibatch_step, carry, (mbs, ptx_batch))

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
  def fn(state, observed_kl):
    ctl = losses.KLControllerState(**state["kl_ctl"])
    new = losses.kl_controller_update(ctl, observed_kl, batch_size)
    return dict(state, kl_ctl=new._asdict())
  return fn


def train(config, workdir: str) -> dict:
  config_lib.validate(config)
  if config.task == "default":
    from rlhf_jax import pipeline
    return pipeline.run_until("ppo", config, workdir)
  return train_stage(config, workdir)


def _load_data(config, tokenizer):
  from rlhf_jax import data
  prompts = data.load_prompts(batching.spec_from_config(config.data.train), tokenizer,
                              config.data.max_prompt_len)
  log.info("[ppo] prompts: %s", prompts.report)
  ptx = None
  if config.ppo.ptx_coef > 0:
    if not config.data.ptx.path:
      from rlhf_jax.errors import ConfigError
      raise ConfigError("data.ptx.path", "", "a plain-text dataset when ppo.ptx_coef > 0 "
                        "(or set --config.ppo.ptx_coef=0 for plain PPO)")
    ptx = data.load_text(batching.spec_from_config(config.data.ptx), tokenizer,
                         config.data.max_len, pack=True)
    log.info("[ppo] pretraining data: %s", ptx.report)
  return prompts, ptx


def train_stage(config, workdir: str) -> dict:
  p = config.ppo
  mesh = setup.make_mesh(config)
  batching.check_batch_split(mesh, config.train.batch_size)
  if p.ptx_coef > 0:
    batching.check_batch_split(mesh, p.minibatches * p.ptx_batch_size,
                               "ppo.minibatches * ppo.ptx_batch_size")
  rules = state_lib.parse_rules(config.sharding_rules)
  if not config.model.init_from or not p.reward_from:
    from rlhf_jax.errors import ConfigError
    raise ConfigError("model.init_from" if not config.model.init_from else "ppo.reward_from",
                      "", "the SFT policy and the reward model (HF dirs or stage workdirs)")
  policy_dir = setup.resolve_model_dir(config.model.init_from, "causal")
  reward_dir = setup.resolve_model_dir(p.reward_from, "scalar", "ppo.reward_from")
  value_from = p.value_from or p.reward_from
  tokenizer = setup.load_tokenizer(config, policy_dir)
  _check_tokenizers(config, tokenizer, reward_dir, value_from)
  prompts, ptx = _load_data(config, tokenizer)

  policy_cfg, ref, pol_shard, pol_src = setup.initial_model(
      config, mesh, rules, "causal", config.model.init_from, tokenizer=tokenizer)
  policy = jax.tree.map(jnp.copy, ref)   # the trained copy; `ref` stays the frozen SFT model
  reward_cfg, reward, rew_shard, rew_src = setup.initial_model(
      config, mesh, rules, "scalar", p.reward_from, tokenizer=tokenizer,
      field="ppo.reward_from")
  value_cfg, value, val_shard, val_src = setup.initial_model(
      config, mesh, rules, "scalar", value_from, tokenizer=tokenizer, seed_offset=1,
      field="ppo.value_from")
  normalization = setup.read_rm_normalization(reward_dir)
  eos_id = tokenizer.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

  total_steps = int(p.iterations)
  policy_tx = optim.make_optimizer(config.optim, total_steps * p.epochs * p.minibatches)
  value_tx = optim.make_optimizer(config.optim, total_steps * p.epochs * p.minibatches,
                                  lr_scale=p.value_lr_scale)
  shardings, base_init, _ = state_lib.build(
      mesh, config.seed, {"policy": (policy, pol_shard, policy_tx),
                          "value": (value, val_shard, value_tx)})
  # A plain dict in the state (checkpoints as such); KLControllerState(**d) to update it.
  kl_init = losses.kl_controller_init(p.kl_controller, p.kl_coef, p.kl_target,
                                      p.kl_horizon)._asdict()
  shardings["kl_ctl"] = jax.tree.map(lambda _: sharding.replicated(mesh), kl_init)
  if p.ema_decay > 0:
    shardings["ema"] = pol_shard

  def init_state():
    fresh = base_init()
    fresh["kl_ctl"] = jax.device_put(kl_init, shardings["kl_ctl"])
    if p.ema_decay > 0:
      fresh["ema"] = jax.tree.map(jnp.copy, fresh["policy"])
    return fresh

  def abstract_state():
    return state_lib.abstract_with_shardings(jax.eval_shape(init_state), shardings)

  B, P, N = config.train.batch_size, config.data.max_prompt_len, p.max_new_tokens
  if B % p.minibatches:
    from rlhf_jax.errors import ConfigError
    raise ConfigError("ppo.minibatches", p.minibatches,
                      f"a divisor of train.batch_size={B}")
  jitted_for_prompt_len = {}

  def jitted(prompt_len: int):
    """(experience fn, update fn) for prompts of `prompt_len` tokens (one per length bucket)."""
    if prompt_len not in jitted_for_prompt_len:
      jitted_for_prompt_len[prompt_len] = (
          jax.jit(experience_lib.make_experience_fn(
              policy_cfg, value_cfg, reward_cfg, p, normalization, eos_id, prompt_len)),
          jax.jit(make_update_fn(policy_cfg, value_cfg, p, policy_tx, value_tx, prompt_len,
                                 use_ptx=ptx is not None),
                  in_shardings=(shardings, None, None, None),
                  out_shardings=(shardings, None), donate_argnums=(0,)))
    return jitted_for_prompt_len[prompt_len]

  kl_fn = jax.jit(make_kl_update_fn(p, B), donate_argnums=(0,),
                  in_shardings=(shardings, None), out_shardings=shardings)
  # Prompts are left padded: cut to the prompt-length bucket of each batch; responses are
  # cut after the rollout to the bucket of the longest one (rows that stopped early).
  prompt_bucketing = batching.length_bucketing(config, ("input_ids", "attention_mask"), side="left")
  response_buckets = batching.response_buckets(config, N)
  prompt_it = batching.iterator(prompts.arrays, B, config.seed, prompt_bucketing)
  ptx_it = batching.iterator(ptx.arrays, p.minibatches * p.ptx_batch_size, config.seed + 1) \
      if ptx is not None else None
  base_key = jax.random.PRNGKey(config.seed)

  def generate(policy_params, prompt_batch, key):
    return sampling.generate(policy_cfg, policy_params, prompt_batch["input_ids"],
                             prompt_batch["attention_mask"], key, max_new_tokens=N,
                             temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                             eos_id=eos_id, pad_id=pad_id)

  def step(state, index):
    t0 = time.perf_counter()
    gen_key, perm_key = jax.random.split(jax.random.fold_in(base_key, index))
    batch = sharding.host_to_global(mesh, next(prompt_it))
    out = batching.cut_responses(generate(state["policy"], batch, gen_key), response_buckets)
    jax.block_until_ready(out.tokens)
    t1 = time.perf_counter()
    kl_coef = state["kl_ctl"]["kl_coef"]
    exp_fn, update_fn = jitted(batch["input_ids"].shape[1])
    exp, metrics = exp_fn(state["policy"], ref, state["value"], reward, kl_coef,
                          batch["input_ids"], batch["attention_mask"], out.tokens, out.mask)
    jax.block_until_ready(exp)
    t2 = time.perf_counter()
    ptx_batch = sharding.host_to_global(mesh, next(ptx_it)) if ptx_it is not None \
        else jnp.zeros((p.minibatches,))
    state, train_metrics = update_fn(state, exp, ptx_batch, perm_key)
    state = kl_fn(state, metrics["kl"])
    jax.block_until_ready(state["step"])
    t3 = time.perf_counter()
    metrics = dict(metrics, **train_metrics)
    metrics.update(_warn_bounds(index, float(metrics["kl"]), float(metrics["score"]), p))
    metrics.update(time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                   tokens_per_sec=float(B * N) / max(t1 - t0, 1e-9))
    return state, metrics

  eval_prompts = None
  if config.data.eval.path:
    from rlhf_jax import data
    eval_prompts = data.load_prompts(batching.spec_from_config(config.data.eval), tokenizer,
                                     config.data.max_prompt_len)

  def evaluate(state):
    if eval_prompts is None:
      return {}
    scores, kls = [], []
    for i, batch in enumerate(batching.eval_batches(eval_prompts.arrays, B,
                                                    config.train.eval_batches,
                                                    prompt_bucketing)):
      batch = sharding.host_to_global(mesh, batch)
      out = batching.cut_responses(
          generate(state["policy"], batch, jax.random.fold_in(base_key, 10**6 + i)),
          response_buckets)
      exp_fn, _ = jitted(batch["input_ids"].shape[1])
      _, m = exp_fn(state["policy"], ref, state["value"], reward, 0.0,
                    batch["input_ids"], batch["attention_mask"], out.tokens, out.mask)
      scores.append(float(m["score"]))
      kls.append(float(m["kl"]))
    return dict(score=float(np.mean(scores)), kl=float(np.mean(kls))) if scores else {}

  def finish(state):
    final = state["ema"] if p.ema_decay > 0 else state["policy"]
    out = setup.export(workdir, policy_cfg, final, tokenizer, "causal")
    log.info("[ppo] exported policy to %s", out)

  setup.announce("ppo", mesh, {"policy": pol_src, "reward": rew_src, "value": val_src},
                 {"policy": models.param_count(policy), "reward": models.param_count(reward),
                  "value": models.param_count(value)},
                 dict(rollout_batch=B, minibatches=p.minibatches, epochs=p.epochs,
                      prompt_len=P, new_tokens=N, ptx_batch=p.ptx_batch_size if ptx else 0,
                      iterations=total_steps))
  stage = loop.Stage(name="ppo", total_steps=total_steps, init_state=init_state,
                     abstract_state=abstract_state, step=step, evaluate=evaluate,
                     data_state=lambda: dict(prompts=prompt_it.state(),
                                             ptx=ptx_it.state() if ptx_it else None),
                     restore_data_state=lambda d: _restore_iters(d, prompt_it, ptx_it),
                     finish=finish)
  return loop.run(stage, workdir, config.train)


def _check_tokenizers(config, tokenizer, reward_dir: str, value_from: str) -> None:
  """The RM (and value model) must read the policy's token ids: same tokenizer, or fail now."""
  from rlhf_jax import data
  checks = [("reward model", reward_dir)]
  if value_from != config.ppo.reward_from:
    checks.append(("value model",
                   setup.resolve_model_dir(value_from, "scalar", "ppo.value_from")))
  for name, model_dir in checks:
    if not any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("tokenizer_config.json", "tokenizer.json")):
      log.warning("[ppo] no tokenizer saved next to the %s (%s): cannot check that it "
                  "matches the policy's", name, model_dir)
      continue
    import transformers
    other = transformers.AutoTokenizer.from_pretrained(model_dir)
    if other.pad_token is None and other.eos_token is not None:
      other.pad_token = other.eos_token
    data.check_same_tokenizer(tokenizer, other, names=("policy", name))


def _warn_bounds(index: int, kl: float, score: float, p) -> dict:
  """Loud log lines (and 0/1 metrics) when KL or the RM score leave `ppo.*_warn` bounds."""
  flags = {}
  for name, value, bound, why in (
      ("kl", kl, p.kl_warn, "the policy is drifting far from the SFT model"),
      ("score", score, p.score_warn, "the policy may be exploiting the reward model")):
    if not bound:
      continue
    exceeded = not np.isfinite(value) or abs(value) > bound
    flags[f"{name}_warn"] = int(exceeded)
    if exceeded:
      log.warning("[ppo] WARNING iteration %d: %s=%.4g is beyond ppo.%s_warn=%g: %s "
                  "(lower optim.lr / raise ppo.kl_coef)", index + 1, name, value, name,
                  bound, why)
  return flags


def _restore_iters(d: dict, prompt_it, ptx_it) -> None:
  if d.get("prompts"):
    prompt_it.restore(d["prompts"])
  if ptx_it is not None and d.get("ptx"):
    ptx_it.restore(d["ptx"])
