"""Step 1 (and the base model's pretraining): next-token cross-entropy.

SFT masks prompt tokens out of the loss (InstructGPT §3.5); the `pretrain` stage is the same
step on plain text with every token in the loss.

    python launch/train.py --config=configs/sft.py --workdir=runs/sft \
        --config.task= --config.model.init_from=/path/to/hf_model \
        --config.data.train.path=/path/to/train.jsonl
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from rlhf_jax import losses, models
from rlhf_jax import config as config_lib
from rlhf_jax.trainers import batching, setup, single_model
from rlhf_jax.trainers import state as state_lib

log = logging.getLogger("rlhf_jax")


def lm_loss_and_count(cfg, params, batch):
  """Masked next-token NLL (mean over loss tokens) and the number of loss tokens.

  The loss is taken from the final hidden states chunk by chunk
  (`losses.sft_loss_from_hidden`), so no [B, T, V] float32 logits are ever held.
  """
  hidden = models.hidden_states(cfg, params, batch["input_ids"], batch["attention_mask"])
  targets = batch["input_ids"][:, 1:]
  mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
  loss = losses.sft_loss_from_hidden(hidden[:, :-1], models.unembedding(cfg, params),
                                     targets, mask)
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
  w = single_model.prepare(
      config, "causal", lambda tok, split: load_stage_data(config, tok, split),
      make_train_step, make_eval_step, ("input_ids", "attention_mask", "loss_mask"))

  def evaluate(state):
    sums = single_model.eval_sums(w, config, state["params"])
    if sums is None:
      return {}
    total, count = sums
    return dict(loss=total / max(count, 1.0))

  def finish(state):
    out = setup.export(workdir, w.cfg, state["params"], w.tokenizer, "causal")
    log.info("[%s] exported policy to %s", config.stage, out)

  return single_model.run(
      w, config, workdir, "policy", evaluate, finish,
      dict(global_batch=config.train.batch_size, grad_accum=config.train.grad_accum,
           seq_len=config.data.max_len, steps=w.total_steps,
           examples=len(w.train_data.arrays["input_ids"])))
