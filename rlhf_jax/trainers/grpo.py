"""Critic-free online RL: GRPO, Dr. GRPO, RLOO and REINFORCE++ on PPO's pieces.

One iteration = a rollout of G responses per prompt (`ppo.rollout`: ONE `sampling.generate`
call on the prompt batch with each row repeated G times, so a prompt's samples are
consecutive rows, the layout the group baselines of `losses.online` expect), the scores
(`ppo_experience.response_scores`: the RM and/or the reward function, weights and the
no-EOS penalty exactly as PPO), the advantages of `grpo.estimator`, then `ppo.epochs` ×
`ppo.minibatches` updates of `losses.grpo_policy_loss` as one jitted nested `lax.scan`:

    grpo          Â_i = (r_i − mean_G r) / (std_G r + ε)   + β · k3 KL loss term  (Shao et al.)
    dr_grpo       Â_i =  r_i − mean_G r                    + β · k3 KL loss term  (Liu et al.)
    rloo          Â_i =  r_i − mean_{j≠i} r_j              + β · k3 KL loss term  (Ahmadian et al.)
    reinforce_pp  A_t = whiten_batch(r − β Σ_{s≥t} kl_s)   (KL in the reward, no loss term; Hu)

No value model: the state is the policy and its optimiser state; the reference is the frozen
SFT policy. `train.batch_size` counts prompts (a rollout has `train.batch_size · G` rows).

    python launch/train.py --config=configs/grpo.py --workdir=runs/grpo --config.task= \
        --config.model.init_from=runs/sft --config.ppo.reward_from=runs/rm \
        --config.data.train.path=prompts.jsonl --config.grpo.estimator=rloo

Checkpoints, resume, metrics, samples and export are the loop's and PPO's (`ppo_setup`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, objectives, optim, reward_fns, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import batching, loop, model_init, ppo, ppo_rewards, ppo_setup
from rlhf_jax.trainers import ppo_experience as experience_lib
from rlhf_jax.trainers import state as state_lib

log = logging.getLogger("rlhf_jax")


class Rollout(NamedTuple):
  """One rollout's tensors for the update (PPO's `Experience` without values / returns)."""
  input_ids: jax.Array       # [R, P+N] prompt + response, R = prompts · G
  attention_mask: jax.Array  # [R, P+N]
  response_mask: jax.Array   # [R, N]
  old_logprobs: jax.Array    # [R, N] log π_old at sampling time (logits / temperature)
  ref_logprobs: jax.Array    # [R, N] log π_SFT
  advantages: jax.Array      # [R, N] the estimator's, 0 on padding
  scores: jax.Array          # [R] each response's score
  kls: jax.Array             # [R] Σ_t log π_old / π_SFT over its tokens


def advantages(estimator: str, scores, logprobs, ref_logprobs, mask, group_size: int,
               kl_coef: float, kl_kind: str = "k1"):
  """[R, N] token advantages of one rollout (rows: each prompt's G samples consecutive).

  The group estimators give one advantage per response, broadcast over its valid tokens;
  REINFORCE++ gives per-token returns of the KL-shaped reward, whitened over the batch.
  """
  mask = mask.astype(jnp.float32)
  if estimator == "reinforce_pp":
    return losses.reinforce_pp_advantages(scores, logprobs, ref_logprobs, mask, kl_coef,
                                          kind=kl_kind)
  if estimator == "rloo":
    adv = losses.rloo_advantages(scores, group_size)
  elif estimator in ("grpo", "dr_grpo"):
    adv = losses.grpo_advantages(scores, group_size, scale_by_std=estimator == "grpo")
  else:
    raise ValueError(f"unknown grpo.estimator {estimator!r}")
  return adv[:, None] * mask


def loss_kl_coef(estimator: str, kl_coef: float) -> float:
  """β of the k3 KL loss term: REINFORCE++ puts the KL in the reward instead."""
  return 0.0 if estimator == "reinforce_pp" else float(kl_coef)


def make_rollout_fn(policy_cfg, reward_cfg, ppo_cfg, grpo_cfg, normalization: dict, eos_id,
                    prompt_len: int, group_size: Optional[int]):
  """Returns f(policy, ref, reward, prompt_ids, prompt_mask, tokens, response_mask,
  fn_scores=None, sampler_logprobs=None) -> (Rollout, metrics).

  `group_size` None scores without advantages (evaluation batches need not hold groups).
  `reward_cfg` None: no reward model; `fn_scores` [R] are a reward function's scores;
  `sampler_logprobs` [R, N] replace the policy's forward (`ppo.old_logprobs`, as in PPO).
  """
  temperature = float(ppo_cfg.temperature)
  stops = experience_lib.stop_array(eos_id)
  estimator, beta = grpo_cfg.estimator, float(ppo_cfg.kl_coef)

  def fn(policy, ref, reward, prompt_ids, prompt_mask, tokens, response_mask, fn_scores=None,
         sampler_logprobs=None):
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    rmask = response_mask.astype(jnp.float32)
    old_logp, entropy = experience_lib.old_logprobs(policy_cfg, policy, ids, mask, prompt_len,
                                                    temperature, rmask, sampler_logprobs)
    ref_logp = objectives.response_logprobs(policy_cfg, ref, ids, mask, prompt_len, temperature)
    score, has_eos, length, metrics = experience_lib.response_scores(
        reward_cfg, reward, ids, mask, tokens, response_mask, prompt_len, normalization,
        stops, ppo_cfg, fn_scores)
    kl_seq = jnp.sum(losses.kl_penalty(old_logp, ref_logp, kind="k1") * rmask, axis=1)
    adv = jnp.zeros_like(rmask)
    if group_size is not None:
      adv = advantages(estimator, score, old_logp, ref_logp, rmask, group_size, beta,
                       ppo_cfg.kl_kind)
      if group_size > 1:   # groups whose G scores are all equal: no signal under a baseline
        groups = score.reshape(-1, group_size)
        metrics["flat_group_frac"] = jnp.mean(
            jnp.all(groups == groups[:, :1], axis=1).astype(jnp.float32))
        metrics["group_score_std"] = jnp.mean(jnp.std(groups, axis=1))
      metrics["advantage_abs"] = losses.masked_mean(jnp.abs(adv), rmask)
    rollout = Rollout(ids, mask, rmask, old_logp, ref_logp, adv, score, kl_seq)
    metrics.update(score=jnp.mean(score), kl=jnp.mean(kl_seq), kl_coef=jnp.float32(beta),
                   entropy=losses.masked_mean(entropy, rmask),
                   response_length=jnp.mean(length.astype(jnp.float32)),
                   no_eos_frac=1.0 - jnp.mean(has_eos.astype(jnp.float32)))
    return rollout, metrics

  return fn


def make_update_fn(policy_cfg, ppo_cfg, grpo_cfg, tx, prompt_len: int, use_ptx: bool):
  """(state, rollout, ptx_batch, rng) -> (state, metrics): epochs × minibatch scans of
  `grpo_policy_loss` (+ `ppo.ptx_coef` × the pretraining NLL when `use_ptx`)."""
  temperature = float(ppo_cfg.temperature)
  n_mb, epochs = int(ppo_cfg.minibatches), int(ppo_cfg.epochs)
  beta = loss_kl_coef(grpo_cfg.estimator, ppo_cfg.kl_coef)
  clip_high = float(grpo_cfg.clip_eps_high) or None

  def loss_fn(policy, mb, ptx_mb):
    logp, entropy = objectives.response_logprobs(
        policy_cfg, policy, mb.input_ids, mb.attention_mask, prompt_len, temperature,
        with_entropy=True)
    total, aux = losses.grpo_policy_loss(
        logp, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.response_mask,
        ppo_cfg.clip_eps, beta, clip_eps_high=clip_high, length_norm=grpo_cfg.length_norm)
    ptx_loss = jnp.zeros(())
    if use_ptx:
      ptx_loss, _ = objectives.lm_loss_and_count(policy_cfg, policy, ptx_mb)
      total = total + ppo_cfg.ptx_coef * ptx_loss
    metrics = dict(policy_loss=aux["pg_loss"], kl_loss=aux["kl"], ptx_loss=ptx_loss,
                   policy_clip_frac=aux["clip_frac"], approx_kl=aux["approx_kl"],
                   ratio_mean=aux["ratio_mean"],
                   train_entropy=losses.masked_mean(entropy, mb.response_mask))
    return total, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch_step(carry, xs):
    policy, opt = carry
    mb, ptx_mb = xs
    (loss, metrics), grads = grad_fn(policy, mb, ptx_mb)
    up, opt = tx.update(grads, opt, policy)
    policy = jax.tree.map(jnp.add, policy, up)
    finite = state_lib.all_finite(loss, grads)
    return (policy, opt), dict(metrics, loss=loss, finite=finite)

  def update(state, rollout, ptx_batch, rng):
    rows = rollout.input_ids.shape[0]
    if use_ptx:  # [minibatches * ptx_batch, T] -> one pretraining slice per minibatch
      ptx_batch = jax.tree.map(lambda x: x.reshape((n_mb, -1) + x.shape[1:]), ptx_batch)

    def epoch(carry, key):
      # Advantages were computed over whole groups already: minibatches may split groups.
      perm = jax.random.permutation(key, rows)
      mbs = jax.tree.map(lambda x: x[perm].reshape((n_mb, -1) + x.shape[1:]), rollout)
      return jax.lax.scan(minibatch_step, carry, (mbs, ptx_batch))

    carry = (state["policy"], state["policy_opt"])
    (policy, opt), metrics = jax.lax.scan(epoch, carry, jax.random.split(rng, epochs))
    finite = jnp.all(metrics.pop("finite"))
    metrics = jax.tree.map(jnp.mean, metrics)
    new = dict(state, policy=policy, policy_opt=opt)
    return state_lib.guarded(state, new, finite), metrics

  return update


def load_models(config, mesh, tokenizer, reward_fn=None) -> ppo.Models:
  """PPO's `Models` without a value model: the policy (`model.init_from`), the reward model
  (`ppo.reward_from`, if any; `ppo.load_reward_model`) and the reward function."""
  p = config.ppo
  if reward_fn is None and p.reward_fn:
    reward_fn = reward_fns.load(p.reward_fn)
  rules = state_lib.parse_rules(config.sharding_rules)
  policy_dir = workdir_lib.resolve_model_dir(config.model.init_from, "causal")
  policy = model_init.initial_model(config, mesh, rules, "causal", config.model.init_from,
                                    tokenizer=tokenizer)
  reward, normalization = ppo.load_reward_model(config, mesh, rules, tokenizer)
  eos_id = tokenizer.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return ppo.Models(policy=policy, value=None, reward=reward, normalization=normalization,
                    eos_id=eos_id, pad_id=pad_id,
                    stop_ids=tuple(data.stop_ids(tokenizer, policy_dir)), reward_fn=reward_fn,
                    tokenizer=tokenizer)


@dataclasses.dataclass
class Parts:
  """What one GRPO iteration runs: the models, the state and the jitted functions."""
  config: Any                 # the stage config (`ppo`, `grpo`, `train.batch_size`, ...)
  mesh: Any
  models: ppo.Models          # `policy` is the frozen reference from `build` on
  use_ptx: bool
  tx: Any
  shardings: dict
  init_state: Callable        # () -> fresh state pytree (born sharded)
  abstract_state: Callable    # () -> ShapeDtypeStructs with shardings (restore target)
  response_buckets: tuple
  _cache: dict = dataclasses.field(default_factory=dict)

  @property
  def group_size(self) -> int:
    return int(self.config.grpo.group_size)

  def rollout_fn(self, prompt_len: int, train: bool = True):
    """The jitted rollout scoring for prompts of `prompt_len` tokens (with advantages when
    `train`; evaluation batches are plain prompts)."""
    key = ("rollout", prompt_len, train)
    if key not in self._cache:
      m = self.models
      self._cache[key] = jax.jit(make_rollout_fn(
          m.policy.cfg, m.reward.cfg if m.reward else None, self.config.ppo, self.config.grpo,
          m.normalization, m.finish_ids(), prompt_len, self.group_size if train else None))
    return self._cache[key]

  def update_fn(self, prompt_len: int):
    key = ("update", prompt_len)
    if key not in self._cache:
      c = self.config
      self._cache[key] = jax.jit(
          make_update_fn(self.models.policy.cfg, c.ppo, c.grpo, self.tx, prompt_len,
                         use_ptx=self.use_ptx),
          in_shardings=(self.shardings, None, None, None),
          out_shardings=(self.shardings, None), donate_argnums=(0,))
    return self._cache[key]


def build(config, mesh, models: ppo.Models, use_ptx: bool) -> Parts:
  """The state (the trained policy and its optimiser state) and jitted functions over
  `mesh`; the reference becomes a frozen compute-dtype copy, as in PPO."""
  p, B, G = config.ppo, config.train.batch_size, int(config.grpo.group_size)
  if B % jax.process_count():
    raise ConfigError("train.batch_size", B, f"a multiple of the {jax.process_count()} "
                      "processes (each feeds whole prompts' groups)")
  batching.check_batch_split(mesh, B * G, "train.batch_size * grpo.group_size")
  if use_ptx:
    batching.check_batch_split(mesh, p.minibatches * p.ptx_batch_size,
                               "ppo.minibatches * ppo.ptx_batch_size")
  if (B * G) % p.minibatches:
    raise ConfigError("ppo.minibatches", p.minibatches,
                      f"a divisor of train.batch_size * grpo.group_size = {B * G}")
  tx = optim.make_optimizer(config.optim, int(p.iterations) * p.epochs * p.minibatches)
  policy = jax.tree.map(jnp.copy, models.policy.params)   # the trained copy; the ref stays
  models = dataclasses.replace(models, policy=model_init.frozen(models.policy))
  shardings, init_state, abstract_state = state_lib.build(
      mesh, config.seed, {"policy": (policy, models.policy.shardings, tx)})
  return Parts(config=config, mesh=mesh, models=models, use_ptx=use_ptx, tx=tx,
               shardings=shardings, init_state=init_state, abstract_state=abstract_state,
               response_buckets=batching.response_buckets(config, p.max_new_tokens))


def repeat_prompts(host_batch: dict, group_size: int) -> dict:
  """Each row of a host prompt batch `group_size` times, consecutively (the group layout).

  Done per process before the batch becomes global, so every process holds whole groups
  and the reward function scores its own rows, as in PPO."""
  return {k: np.repeat(np.asarray(v), group_size, axis=0) for k, v in host_batch.items()}


def score_rollout(parts: Parts, policy, batch, out, prompts=None, train: bool = True):
  """(Rollout, metrics, `ppo_rewards.Scored` or None): the reward function's scores (host),
  then the jitted rollout scoring."""
  m = parts.models
  scored, fn_time = None, 0.0
  if m.reward_fn is not None:
    t = time.perf_counter()
    scored = ppo_rewards.function_scores(parts.mesh, m, batch, out, prompts)
    fn_time = time.perf_counter() - t
  fn = parts.rollout_fn(batch["input_ids"].shape[1], train)
  extra = () if scored is None else (scored.scores,)
  rollout, metrics = fn(policy, m.policy.params, m.reward.params if m.reward else None,
                        batch["input_ids"], batch["attention_mask"], out.tokens, out.mask,
                        *extra, **experience_lib.reused_logprobs(parts.config.ppo, out))
  if scored is not None:
    metrics = dict(metrics, time_reward_fn=fn_time)
  return rollout, metrics, scored


def iteration(parts: Parts, state, batch, ptx_batch, key, prompts=None, samples: int = 0):
  """One iteration on a global batch of grouped prompts: rollout, scores, update.

  Args:
    batch: global `input_ids` / `attention_mask` [B·G, P] (left padded), each prompt's G
      copies consecutive (`repeat_prompts`).
    ptx_batch: global pretraining batch [minibatches · ptx_batch_size, T], or None.
    key: this iteration's PRNG key (rollout and minibatch order).
    prompts: this process's prompt texts in row order (None: decoded from the tokens).
    samples: > 0 adds `metrics["samples"]`, this process's first `samples` rows.
  """
  t0 = time.perf_counter()
  gen_key, perm_key = jax.random.split(key)
  out = ppo.rollout(parts, state["policy"], batch, gen_key)
  jax.block_until_ready(out.tokens)
  t1 = time.perf_counter()
  rollout, metrics, scored = score_rollout(parts, state["policy"], batch, out, prompts)
  jax.block_until_ready(rollout)
  t2 = time.perf_counter()
  rows = ppo_rewards.sample_rows(parts.models, batch, out, rollout, samples, prompts, scored) \
      if samples > 0 else None
  if ptx_batch is None:
    ptx_batch = jnp.zeros((parts.config.ppo.minibatches,))
  state, train_metrics = parts.update_fn(batch["input_ids"].shape[1])(state, rollout,
                                                                       ptx_batch, perm_key)
  jax.block_until_ready(state["step"])
  t3 = time.perf_counter()
  metrics = dict(metrics, **train_metrics)
  metrics.update(time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                 tokens_per_sec=float(jnp.sum(out.mask)) / max(t1 - t0, 1e-9))
  if rows is not None:
    metrics["samples"] = rows
  return state, metrics


def evaluate(parts: Parts, state, batches, base_key, prompts=None) -> dict:
  """Mean score, KL to the reference (and `fn_score` with a reward function) of the policy's
  samples on global eval prompt batches (one sample per prompt)."""
  batches = list(batches)
  prompts = list(prompts) if prompts is not None else [None] * len(batches)
  means: dict = {"score": [], "kl": [], "fn_score": []}
  for i, batch in enumerate(batches):
    out = ppo.rollout(parts, state["policy"], batch, jax.random.fold_in(base_key, 10**6 + i))
    _, m, _ = score_rollout(parts, state["policy"], batch, out, prompts[i], train=False)
    for k in means:
      if k in m:
        means[k].append(float(m[k]))
  return {k: float(np.mean(v)) for k, v in means.items() if v}


def export_models(parts: Parts, state, workdir: str, tokenizer) -> dict:
  """Writes the policy to `<workdir>/export/policy` (HF format); returns name -> dir."""
  return {"policy": workdir_lib.export(workdir, parts.models.policy.cfg, state["policy"],
                                       tokenizer, "causal")}


def train(config, workdir: str) -> dict:
  """Runs GRPO / Dr. GRPO / RLOO / REINFORCE++ to completion; exports the policy."""
  p, g, B = config.ppo, config.grpo, config.train.batch_size
  G = int(g.group_size)
  if not config.model.init_from:
    raise ConfigError("model.init_from", "", "the SFT policy (an HF dir or its stage workdir)")
  if not p.reward_from and not p.reward_fn:
    raise ConfigError("ppo.reward_from", "", "the reward model (an HF dir or its stage "
                      "workdir), or a Python reward function in ppo.reward_fn=file.py:name")
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
  prompt_bucketing = batching.length_bucketing(config, ("input_ids", "attention_mask"),
                                               side="left")
  prompt_it = batching.iterator(ppo_setup.with_rows(prompts), B, config.seed,
                                prompt_bucketing)
  ptx_it = batching.iterator(ptx.arrays, p.minibatches * p.ptx_batch_size, config.seed + 1) \
      if ptx is not None else None
  base_key = jax.random.PRNGKey(config.seed)
  logs = ppo_setup.RunLogs(config, workdir, stage="grpo")

  def step(state, index):
    host = repeat_prompts(next(prompt_it), G)
    batch, texts = ppo_setup.split_rows(mesh, host, prompts.texts)
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
    # Eval batches hold B·G distinct prompts (one sample each): the rollout's row count.
    split = [ppo_setup.split_rows(mesh, b, eval_prompts.texts)
             for b in batching.eval_batches(ppo_setup.with_rows(eval_prompts), B * G,
                                            config.train.eval_batches, prompt_bucketing)]
    return evaluate(parts, state, [b for b, _ in split], base_key,
                    prompts=[t for _, t in split])

  def finish(state):
    for name, out in export_models(parts, state, workdir, tokenizer).items():
      log.info("[grpo] exported %s to %s", name, out)

  m = parts.models
  loaded = {"policy": m.policy, "reward": m.reward}
  loop.announce("grpo", mesh, {k: v for k, v in loaded.items() if v is not None},
                dict(estimator=g.estimator, prompts=B, group_size=G, rollout_rows=B * G,
                     minibatches=p.minibatches, epochs=p.epochs,
                     prompt_len=config.data.max_prompt_len, new_tokens=p.max_new_tokens,
                     ptx_batch=p.ptx_batch_size if ptx else 0, iterations=int(p.iterations)))
  if m.reward_fn is not None:
    log.info("[grpo] reward: %s%s", f"{p.reward_fn_weight} * {m.reward_fn.spec}",
             f" + {p.reward_model_weight} * normalised RM score" if m.reward else "")
  stage = loop.Stage(name="grpo", total_steps=int(p.iterations), init_state=parts.init_state,
                     abstract_state=parts.abstract_state, step=step, evaluate=run_eval,
                     data_state=lambda: dict(prompts=prompt_it.state(),
                                             ptx=ptx_it.state() if ptx_it else None),
                     restore_data_state=lambda d: ppo_setup.restore_iters(d, prompt_it,
                                                                          ptx_it),
                     finish=finish)
  with logs, metrics_lib.attached(workdir, "grpo", [logs.wandb]):
    return loop.run(stage, workdir, config.train)
