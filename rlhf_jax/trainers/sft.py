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

from rlhf_jax import objectives
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import batching, single_model
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers.model_init import Model

log = logging.getLogger("rlhf_jax")

BUCKET_KEYS = ("input_ids", "attention_mask", "loss_mask")


def make_train_step(cfg, tx, grad_accum: int, to_params=None):
  """One update from a global batch, split into `grad_accum` microbatches (lax.scan).

  Each microbatch's mean loss is weighted by its share of the batch's loss tokens, so the
  accumulated gradient equals the token-level mean over the whole batch. `to_params`
  (LoRA): state["params"] -> the model's params (the merge with the frozen base), so the
  gradient and the optimiser see the trainable tree only.
  """

  def micro_loss(params, micro, total_tokens, key):
    if to_params is not None:
      params = to_params(params)
    loss, count = objectives.lm_loss_and_count(cfg, params, micro, dropout_rng=key)
    return loss * count / jnp.maximum(total_tokens, 1), (loss, count)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch):
    micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
    total = jnp.sum(batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:])

    keys = objectives.dropout_keys(cfg, state["rng"], state["step"], grad_accum)

    def body(acc, xs):
      mb, key = xs
      (weighted, _), grads = grad_fn(state["params"], mb, total, key)
      return jax.tree.map(jnp.add, acc, (weighted, grads)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
    (loss, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
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
    loss, count = objectives.lm_loss_and_count(cfg, params, batch)
    return loss * count, count
  return step


def load_data(config, tokenizer, split_cfg):
  """SFT rows (prompt/completion or messages) or, for `pretrain`, packed plain text."""
  spec = batching.spec_from_config(split_cfg)
  if config.stage == "pretrain":
    return batching.load("text", spec, tokenizer, seq_len=config.data.max_len, pack=True)
  return batching.load("sft", spec, tokenizer, max_prompt_len=config.data.max_prompt_len,
                       max_len=config.data.max_len)


def build(config, mesh, model: Model, total_steps: int) -> single_model.Parts:
  """The SFT state and jitted steps for `model` (bench/ and tests call this too)."""
  return single_model.build(config, mesh, model, total_steps, make_train_step, make_eval_step)


step = single_model.step   # (parts, state, host batch) -> (state, metrics)


def train(config, workdir: str) -> dict:
  """Runs SFT (or pretraining) to completion; exports the policy to `<workdir>/export`."""
  inputs, parts = single_model.start(config, "causal", functools.partial(load_data, config),
                                     build)

  def finish(state):
    out = workdir_lib.export(workdir, parts.model.cfg, parts.model_params(state["params"]),
                             inputs.tokenizer, "causal")
    log.info("[%s] exported policy to %s", config.stage, out)
    if parts.lora is not None and config.model.lora.export_adapter:
      out = workdir_lib.export_adapter(workdir, parts.model.cfg, state["params"]["adapters"],
                                       parts.lora, parts.model.source)
      log.info("[%s] exported the LoRA adapter (PEFT) to %s", config.stage, out)

  return single_model.run(
      parts, inputs, config, workdir, BUCKET_KEYS,
      lambda sums: dict(loss=sums[0] / max(sums[1], 1.0)), finish, "policy",
      dict(global_batch=config.train.batch_size, grad_accum=config.train.grad_accum,
           seq_len=config.data.max_len, steps=parts.total_steps, examples=inputs.n_rows))
