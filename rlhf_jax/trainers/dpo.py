r"""Offline preference optimisation: DPO on pairs and K-way Plackett–Luce DPO on rankings.

The policy starts from the SFT model and is trained straight on the comparison data the
reward model reads (`data.load_comparisons`: chosen/rejected rows are K = 2, ranking rows
carry K responses and ranks, ties allowed), with no reward model and no sampling. Each
response y of a prompt x gets its sequence log-probability log π(y|x) = Σ_t log π(y_t|x, y<t)
over the response tokens (from `prompt_len` to the end of the row: the end-of-turn text and
EOS included, as SFT's loss mask), under the policy and under the reference — the init
(SFT) model, frozen: a compute-dtype copy outside the train state (no optimiser state, not
checkpointed), read once per batch. The losses are `losses.dpo_loss` (DPO, Rafailov et al.
2023 eq. 7; cDPO label smoothing; IPO, Azar et al. 2023 eq. 17) and
`losses.plackett_luce_dpo_loss` (App. A.3 with Breslow ties), selected by `dpo.rankings`:

- `plackett_luce`: a ranking is one likelihood (for K = 2: DPO exactly);
- `all_pairs`: each pair of a prompt's responses with different ranks is one DPO / IPO term,
  averaged within the prompt (InstructGPT eq. 1's weighting: a prompt counts once however
  many pairs its ranking makes).

Either way the batch loss is the mean over prompts with at least one ordered pair; with
`train.grad_accum` each microbatch is weighted by its share of those prompts. Dropout is off
in both forward passes (as in PPO: the log-ratio compares two deterministic models). Metrics
(train and eval): loss, accuracy / margin / chosen_rewards / rejected_rewards over every
ordered pair (w ranked above l) of the batch, with implicit rewards β·(log π − log π_ref).

    python launch/train.py --config=configs/dpo.py --workdir=runs/dpo --config.task= \
        --config.model.init_from=runs/sft --config.data.train.path=comparisons.jsonl
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, models, optim, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import batching, model_init, rm, single_model
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers.model_init import Model

log = logging.getLogger("rlhf_jax")

BUCKET_KEYS = ("input_ids", "attention_mask")
LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo"}   # dpo.loss -> losses.dpo_loss(loss_type=...)
# Pair statistics summed over microbatches / eval batches, then divided by the pair count.
PAIR_STATS = ("accuracy", "margin", "chosen_rewards", "rejected_rewards")


def sequence_logprobs(cfg, params, batch):
  """log π(y|x) of each response: Σ of its token log-probs from `prompt_len` on, [B, K].

  `batch`: input_ids / attention_mask [B, K, T] (right padded), prompt_len [B]. Padding
  slots (mask 0) give 0. The logits are float32 [B·K, T−1, V] (what SFT's loss avoids by
  chunking; fine at DPO's batch sizes, and the place to chunk if the vocabulary is large).
  """
  b, k, t = batch["input_ids"].shape
  ids = batch["input_ids"].reshape(b * k, t)
  mask = batch["attention_mask"].reshape(b * k, t)
  hidden = models.hidden_states(cfg, params, ids, mask)[:, :-1]
  logits = jnp.einsum("BTD,DV->BTV", hidden, models.unembedding(cfg, params),
                      preferred_element_type=jnp.float32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, 1:, None],
                             axis=-1)[..., 0]
  # Position t predicts token t + 1: a response token when t + 1 >= prompt_len.
  start = jnp.repeat(batch["prompt_len"], k)[:, None]
  response = (jnp.arange(1, t)[None, :] >= start) & (mask[:, 1:] > 0)
  return jnp.sum(jnp.where(response, logp, 0.0), axis=-1).reshape(b, k)


def _all_pairs_loss(d, policy, ref, ranks, valid):
  """Mean over prompts of the mean DPO / IPO loss over the prompt's pairs of distinct ranks."""
  i, j = np.triu_indices(policy.shape[1], 1)   # static: the K(K−1)/2 unordered slot pairs
  ok = valid[:, i] & valid[:, j] & (ranks[:, i] != ranks[:, j])
  i_first = ranks[:, i] < ranks[:, j]

  def orient(x):   # (better, worse) of each pair
    return jnp.where(i_first, x[:, i], x[:, j]), jnp.where(i_first, x[:, j], x[:, i])

  (pc, pr), (rc, rr) = orient(policy), orient(ref)
  one = functools.partial(losses.dpo_loss, beta=float(d.beta),
                          label_smoothing=float(d.label_smoothing),
                          loss_type=LOSS_TYPES[d.loss])
  per_pair = jax.vmap(lambda a, b, c, e: one(a[None], b[None], c[None], e[None])[0])(
      pc.reshape(-1), pr.reshape(-1), rc.reshape(-1), rr.reshape(-1)).reshape(ok.shape)
  n = jnp.sum(ok, axis=1)
  per_prompt = jnp.sum(jnp.where(ok, per_pair, 0.0), axis=1) / jnp.maximum(n, 1)
  return losses.masked_mean(per_prompt, n > 0)


def preference_loss(d, policy, ref, ranks, valid):
  """The batch's loss (mean over prompts with an ordered pair) under `d.rankings`."""
  if d.rankings == "plackett_luce":
    return losses.plackett_luce_dpo_loss(policy, ref, ranks, valid, float(d.beta))[0]
  return _all_pairs_loss(d, policy, ref, ranks, valid)


def pair_sums(beta: float, policy, ref, ranks, valid) -> dict:
  """Sums over ordered valid pairs (w ranked above l) of the implicit-reward statistics."""
  u = beta * jnp.where(valid, policy - ref, 0.0)
  pair = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  uw, ul = u[:, :, None], u[:, None, :]
  total = lambda x: jnp.sum(jnp.where(pair, x, 0.0))  # noqa: E731
  return dict(accuracy=total((uw > ul).astype(jnp.float32)), margin=total(uw - ul),
              chosen_rewards=total(uw), rejected_rewards=total(ul),
              pairs=jnp.sum(pair.astype(jnp.float32)))


def _means(sums: dict) -> dict:
  return {k: sums[k] / jnp.maximum(sums["pairs"], 1.0) for k in PAIR_STATS}


def make_train_step(cfg, tx, grad_accum: int, d):
  """step(state, ref_params, batch) -> (state, metrics); microbatches weighted by prompts."""

  def micro_loss(params, micro, ref_lp, total_prompts):
    lp = sequence_logprobs(cfg, params, micro)
    loss = preference_loss(d, lp, ref_lp, micro["ranks"], micro["valid"])
    n = rm.prompts_with_pairs(micro["ranks"], micro["valid"])
    sums = pair_sums(float(d.beta), lp, ref_lp, micro["ranks"], micro["valid"])
    return loss * n / jnp.maximum(total_prompts, 1), jax.lax.stop_gradient(sums)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, ref_params, batch):
    micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
    total = rm.prompts_with_pairs(batch["ranks"], batch["valid"])

    def body(acc, mb):
      ref_lp = sequence_logprobs(cfg, ref_params, mb)   # the reference: once per response
      (weighted, sums), grads = grad_fn(state["params"], mb, ref_lp, total)
      return jax.tree.map(jnp.add, acc, (weighted, sums, grads)), None

    zeros = (jnp.zeros(()), {k: jnp.zeros(()) for k in PAIR_STATS + ("pairs",)},
             jax.tree.map(jnp.zeros_like, state["params"]))
    (loss, sums, grads), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(jnp.add, state["params"], updates)
    new = state_lib.guarded(state, dict(state, params=params, opt_state=opt_state),
                            state_lib.all_finite(loss, grads))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return new, dict(loss=loss, grad_norm=grad_norm, **_means(sums))

  return step


def make_eval_step(cfg, d):
  """(params, ref_params, batch) -> (loss·prompts, prompts, pair sums..., pairs)."""

  def step(params, ref_params, batch):
    lp = sequence_logprobs(cfg, params, batch)
    ref_lp = sequence_logprobs(cfg, ref_params, batch)
    n = rm.prompts_with_pairs(batch["ranks"], batch["valid"])
    loss = preference_loss(d, lp, ref_lp, batch["ranks"], batch["valid"])
    sums = pair_sums(float(d.beta), lp, ref_lp, batch["ranks"], batch["valid"])
    return (loss * n, n) + tuple(sums[k] for k in PAIR_STATS + ("pairs",))

  return step


def summarize_eval(sums) -> dict:
  loss, n, *stats, pairs = sums
  out = dict(loss=loss / max(n, 1.0))
  out.update({k: v / max(pairs, 1.0) for k, v in zip(PAIR_STATS, stats)})
  return out


@dataclasses.dataclass
class Parts(single_model.Parts):
  """`single_model.Parts` plus the frozen reference (its `step_fn` / `eval_fn` pass it in)."""
  reference: Optional[Model] = None


def build(config, mesh, model: Model, total_steps: int) -> Parts:
  """The DPO state (`model`'s float32 params, trained) and jitted steps; the reference is
  `model` as a frozen compute-dtype copy (bench/ and tests call this too). Under bfloat16
  compute `model.params` become the donated state: don't reuse them after the first step."""
  batching.check_batch_split(mesh, config.train.batch_size)
  d = config.dpo
  # The state is donated every step. Under float32 compute the reference IS `model`, so
  # the trained copy needs buffers of its own; under bfloat16 the reference is a cast copy
  # and `model`'s float32 params become the state's (no third copy of the weights).
  reference = model_init.frozen(model)
  trained = jax.tree.map(jnp.copy, model.params) if reference is model else model.params
  tx = optim.make_optimizer(config.optim, total_steps)
  shardings, init_state, abstract_state = state_lib.build(
      mesh, config.seed, {"params": (trained, model.shardings, tx)})
  batch_shard = sharding.batch_sharding(mesh, 1)
  train_fn = jax.jit(make_train_step(model.cfg, tx, config.train.grad_accum, d),
                     in_shardings=(shardings, reference.shardings, batch_shard),
                     out_shardings=(shardings, None), donate_argnums=(0,))
  eval_fn = jax.jit(make_eval_step(model.cfg, d),
                    in_shardings=(model.shardings, reference.shardings, batch_shard))
  ref = reference.params
  return Parts(mesh=mesh, model=dataclasses.replace(model, params=trained),
               total_steps=total_steps, shardings=shardings, init_state=init_state,
               abstract_state=abstract_state,
               step_fn=lambda state, batch: train_fn(state, ref, batch),
               eval_fn=lambda params, batch: eval_fn(params, ref, batch),
               reference=reference)


step = single_model.step   # (parts, state, host batch) -> (state, metrics)


def load_data(config, tokenizer, split_cfg):
  """Comparison rows (pairs or K-way rankings) ending where the policy's samples end."""
  init_dir = workdir_lib.resolve_model_dir(config.model.init_from, "causal") \
      if config.model.init_from else None
  return batching.load("comparisons", batching.spec_from_config(split_cfg), tokenizer,
                       max_prompt_len=config.data.max_prompt_len,
                       max_len=config.data.max_len, k_max=config.dpo.k_max,
                       stop_ids=data.stop_ids(tokenizer, init_dir))


def train(config, workdir: str) -> dict:
  """Trains the policy with DPO; exports it to `<workdir>/export/policy`."""
  inputs, parts = single_model.start(config, "causal", functools.partial(load_data, config),
                                     build)

  def finish(state):
    out = workdir_lib.export(workdir, parts.model.cfg, state["params"], inputs.tokenizer,
                             "causal")
    log.info("[dpo] exported policy to %s", out)

  d = config.dpo
  return single_model.run(
      parts, inputs, config, workdir, BUCKET_KEYS, summarize_eval, finish, "policy",
      dict(global_batch=config.train.batch_size, k=inputs.train_data.arrays["ranks"].shape[1],
           rankings=d.rankings, loss=d.loss, beta=d.beta, grad_accum=config.train.grad_accum,
           seq_len=config.data.max_len, steps=parts.total_steps, prompts=inputs.n_rows))
