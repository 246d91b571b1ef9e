"""Step 2: the reward model.

The SFT transformer with its unembedding replaced by a scalar head read at the last response
token. Each batch element is one prompt with K ranked responses; all C(K,2) pairs of a prompt
form one element of the loss (InstructGPT eq. 1, via `losses.ranking_loss`), so each response
gets one forward pass. Chosen/rejected data is the K = 2 case.

After training the reward is normalised (InstructGPT §3.5: "a bias so that the labeler
demonstrations achieve a mean score of 0"; optionally a gain to unit std as in Ziegler et al.
2019): the constants are measured on demonstrations, written next to the exported RM in
`reward_normalization.json`, and applied wherever the RM scores (`objectives.normalized_scores`).

    python launch/train.py --config=configs/rm.py --workdir=runs/rm --config.task= \
        --config.model.init_from=runs/sft --config.data.train.path=comparisons.jsonl
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.experimental.multihost_utils  # noqa: F401  (process_allgather below)
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, models, objectives, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import batching, single_model
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers.model_init import Model

log = logging.getLogger("rlhf_jax")

BUCKET_KEYS = ("input_ids", "attention_mask")


def prompts_with_pairs(ranks, valid):
  """How many prompts have at least one valid pair with different ranks."""
  both = valid[:, :, None] & valid[:, None, :]
  return jnp.sum(jnp.any(both & (ranks[:, :, None] < ranks[:, None, :]), axis=(1, 2)))


def make_train_step(cfg, tx, grad_accum: int):
  """Ranking-loss update; microbatches weighted by their share of prompts with a pair."""

  def micro_loss(params, micro, total_prompts):
    loss, aux = losses.ranking_loss(objectives.ranked_rewards(cfg, params, micro),
                                    micro["ranks"], micro["valid"])
    n = prompts_with_pairs(micro["ranks"], micro["valid"])
    return loss * n / jnp.maximum(total_prompts, 1), aux["accuracy"] * n

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch):
    micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
    total = prompts_with_pairs(batch["ranks"], batch["valid"])

    def body(acc, mb):
      (weighted, acc_n), grads = grad_fn(state["params"], mb, total)
      return jax.tree.map(jnp.add, acc, (weighted, acc_n, grads)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
    (loss, acc_n, grads), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(jnp.add, state["params"], updates)
    new = state_lib.guarded(state, dict(state, params=params, opt_state=opt_state),
                            state_lib.all_finite(loss, grads))
    return new, dict(loss=loss, accuracy=acc_n / jnp.maximum(total, 1))

  return step


def make_eval_step(cfg):
  def step(params, batch):
    loss, aux = losses.ranking_loss(objectives.ranked_rewards(cfg, params, batch),
                                    batch["ranks"], batch["valid"])
    n = prompts_with_pairs(batch["ranks"], batch["valid"])
    return loss * n, aux["accuracy"] * n, n
  return step


def measure_normalization(cfg, params, mesh, arrays, batch_size: int, gain: bool) -> dict:
  """Mean (and std) of raw rewards on demonstrations (prompt + completion + eos)."""
  fn = jax.jit(lambda p, ids, m, idx: models.scores(cfg, p, ids, m, idx))
  n = len(arrays["input_ids"])
  per_host = batch_size // jax.process_count()
  scores = []
  for start in range(0, n - n % batch_size, batch_size):
    lo = start + jax.process_index() * per_host
    ids = arrays["input_ids"][lo:lo + per_host]
    mask = arrays["attention_mask"][lo:lo + per_host]
    last = (mask.sum(-1) - 1).astype(np.int32)
    batch = sharding.host_to_global(mesh, dict(ids=ids, mask=mask, last=last))
    scores.append(np.asarray(jax.device_get(
        jax.experimental.multihost_utils.process_allgather(
            fn(params, batch["ids"], batch["mask"], batch["last"]), tiled=True))))
  values = np.concatenate(scores) if scores else np.zeros((0,))
  if values.size == 0:
    return dict(mean=0.0, std=1.0, gain=False, n=0)
  return dict(mean=float(values.mean()), std=float(values.std() + 1e-8), gain=bool(gain),
              n=int(values.size))


def load_data(config, tokenizer, split_cfg):
  return data.load_comparisons(batching.spec_from_config(split_cfg), tokenizer,
                               config.data.max_prompt_len, config.data.max_len, config.rm.k_max)


def build(config, mesh, model: Model, total_steps: int) -> single_model.Parts:
  """The RM state and jitted steps for `model` (bench/ and tests call this too)."""
  return single_model.build(config, mesh, model, total_steps, make_train_step, make_eval_step)


step = single_model.step   # (parts, state, host batch) -> (state, metrics)


def export_with_normalization(config, parts: single_model.Parts, tokenizer, params,
                              workdir: str) -> str:
  """Measures the normalisation on `data.norm` and exports the RM with it."""
  cfg = parts.model.cfg
  norm = dict(mean=0.0, std=1.0, gain=False, n=0)
  if config.rm.normalize != "none" and config.data.norm.path:
    demos = data.load_sft(batching.spec_from_config(config.data.norm), tokenizer,
                          config.data.max_prompt_len, config.data.max_len)
    norm = measure_normalization(cfg, params, parts.mesh, demos.arrays,
                                 config.train.batch_size,
                                 gain=config.rm.normalize == "bias_gain")
    log.info("[rm] reward normalisation from %d demonstrations: mean %.4f std %.4f",
             norm["n"], norm["mean"], norm["std"])
  # HF's `score` layer has no bias: fold ours into the normalisation's mean, so the exported
  # model gives the same normalised rewards in transformers as here.
  params = dict(params, head=dict(params["head"]))
  bias = float(np.asarray(jax.device_get(params["head"]["bias"])).reshape(-1)[0])
  params["head"]["bias"] = jnp.zeros_like(params["head"]["bias"])
  norm = dict(norm, mean=norm["mean"] - bias)
  return workdir_lib.export(workdir, cfg, params, tokenizer, "scalar", normalization=norm)


def train(config, workdir: str) -> dict:
  """Trains the reward model; exports it with its normalisation to `<workdir>/export`."""
  inputs, parts = single_model.start(config, "scalar", functools.partial(load_data, config),
                                     build)

  def finish(state):
    out = export_with_normalization(config, parts, inputs.tokenizer, state["params"], workdir)
    log.info("[rm] exported reward model to %s", out)

  def summarize(sums):
    loss, acc, count = sums
    return dict(loss=loss / max(count, 1.0), accuracy=acc / max(count, 1.0))

  return single_model.run(
      parts, inputs, config, workdir, BUCKET_KEYS, summarize, finish, "reward_model",
      dict(global_batch=config.train.batch_size, k_max=config.rm.k_max,
           grad_accum=config.train.grad_accum, seq_len=config.data.max_len,
           steps=parts.total_steps, prompts=inputs.n_rows))
