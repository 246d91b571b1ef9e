"""Step 1 (and the base model's pretraining): next-token cross-entropy.

SFT masks prompt tokens out of the loss (InstructGPT §3.5); the `pretrain` stage is the same
step on plain text with every token in the loss.

    python launch/train.py --config=configs/sft.py --workdir=runs/sft \
        --config.task= --config.model.init_from=/path/to/hf_model \
        --config.data.train.path=/path/to/train.jsonl
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, models, sharding
from rlhf_jax import config as config_lib
from rlhf_jax import optim
from rlhf_jax.trainers import batching, loop, setup
from rlhf_jax.trainers import state as state_lib

log = logging.getLogger("rlhf_jax")


def lm_loss_and_count(cfg, params, batch):
  """Masked next-token NLL (mean over loss tokens) and the number of loss tokens."""
  logits = models.logits(cfg, params, batch["input_ids"], batch["attention_mask"])
  targets = batch["input_ids"][:, 1:]
  mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
  loss = losses.sft_loss(logits[:, :-1], targets, mask)
  return loss, jnp.sum(mask)


def make_train_step(cfg, tx, grad_accum: int):
  """One update from a global batch, split into `grad_accum` microbatches (lax.scan).

  Each microbatch's mean loss is weighted by its share of the batch's loss tokens, so the
  accumulated gradient equals the token-level mean over the whole batch.
  """

  def micro_loss(params, micro, total_tokens):
    loss, count = lm_loss_and_count(cfg, params, micro)
    return loss * count / jnp.maximum(total_tokens, 1), (loss, count)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch):
    micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
    total = jnp.sum(batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:])

    def body(acc, mb):
      (weighted, _), grads = grad_fn(state["params"], mb, total)
      return jax.tree.map(jnp.add, acc, (weighted, grads)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
    (loss, grads), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(jnp.add, state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state)
    new = state_lib.guarded(state, new, state_lib.all_finite(loss, grads))
    return new, dict(loss=loss, grad_norm=_global_norm(grads), tokens=total)

  return step


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_eval_step(cfg):
  def step(params, batch):
    loss, count = lm_loss_and_count(cfg, params, batch)
    return loss * count, count
  return step


def load_stage_data(config, tokenizer, split_cfg):
  """SFT rows (prompt/completion or messages) or, for `pretrain`, packed plain text."""
  from rlhf_jax import data
  spec = batching.spec_from_config(split_cfg)
  if config.stage == "pretrain":
    return data.load_text(spec, tokenizer, config.data.max_len, pack=True)
  return data.load_sft(spec, tokenizer, config.data.max_prompt_len, config.data.max_len)


def train(config, workdir: str) -> dict:
  """Runs SFT (or pretraining) to completion; exports the policy to `<workdir>/export`."""
  config_lib.validate(config)
  if config.task == "default":
    from rlhf_jax import pipeline
    return pipeline.run_until(config.stage, config, workdir)
  return train_stage(config, workdir)


def train_stage(config, workdir: str) -> dict:
  mesh = setup.make_mesh(config)
  batching.check_batch_split(mesh, config.train.batch_size)
  rules = state_lib.parse_rules(config.sharding_rules)
  init_dir = setup.resolve_model_dir(config.model.init_from, "causal") \
      if config.model.init_from else None
  tokenizer = setup.load_tokenizer(config, init_dir)
  train_data = load_stage_data(config, tokenizer, config.data.train)
  log.info("[%s] train data: %s", config.stage, train_data.report)
  eval_data = None
  if config.data.eval.path:
    eval_data = load_stage_data(config, tokenizer, config.data.eval)
    log.info("[%s] eval data: %s", config.stage, eval_data.report)

  cfg, params, p_shard, source = setup.initial_model(
      config, mesh, rules, "causal", config.model.init_from, tokenizer=tokenizer)
  n_examples = len(train_data.arrays["input_ids"])
  total_steps = batching.total_steps(config.train, n_examples)
  tx = optim.make_optimizer(config.optim, total_steps)
  shardings, init_state, abstract_state = state_lib.build(
      mesh, config.seed, {"params": (params, p_shard, tx)})

  batch_shard = sharding.batch_sharding(mesh, 1)
  step_fn = jax.jit(make_train_step(cfg, tx, config.train.grad_accum),
                    in_shardings=(shardings, batch_shard), out_shardings=(shardings, None),
                    donate_argnums=(0,))
  eval_fn = jax.jit(make_eval_step(cfg), in_shardings=(p_shard, batch_shard))
  it = batching.iterator(train_data.arrays, config.train.batch_size, config.seed)

  def step(state, _):
    return step_fn(state, sharding.host_to_global(mesh, next(it)))

  def evaluate(state):
    if eval_data is None:
      return {}
    total, count = 0.0, 0.0
    for batch in batching.eval_batches(eval_data.arrays, config.train.batch_size,
                                       config.train.eval_batches):
      s, c = eval_fn(state["params"], sharding.host_to_global(mesh, batch))
      total, count = total + float(s), count + float(c)
    return dict(loss=total / max(count, 1.0))

  def finish(state):
    out = setup.export(workdir, cfg, state["params"], tokenizer, "causal")
    log.info("[%s] exported policy to %s", config.stage, out)

  setup.announce(config.stage, mesh, {"policy": source},
                 {"policy": models.param_count(params)},
                 dict(global_batch=config.train.batch_size, grad_accum=config.train.grad_accum,
                      seq_len=config.data.max_len, steps=total_steps, examples=n_examples))
  stage = loop.Stage(name=config.stage, total_steps=total_steps, init_state=init_state,
                     abstract_state=abstract_state, step=step, evaluate=evaluate,
                     data_state=it.state, restore_data_state=it.restore, finish=finish)
  return loop.run(stage, workdir, config.train)
