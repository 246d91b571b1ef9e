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
from rlhf_jax.errors import UserError
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

  def micro_loss(params, micro, total_prompts, key):
    loss, aux = losses.ranking_loss(objectives.ranked_rewards(cfg, params, micro, key),
                                    micro["ranks"], micro["valid"])
    n = prompts_with_pairs(micro["ranks"], micro["valid"])
    return loss * n / jnp.maximum(total_prompts, 1), aux["accuracy"] * n

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch):
    micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
    total = prompts_with_pairs(batch["ranks"], batch["valid"])

    keys = objectives.dropout_keys(cfg, state["rng"], state["step"], grad_accum)

    def body(acc, xs):
      mb, key = xs
      (weighted, acc_n), grads = grad_fn(state["params"], mb, total, key)
      return jax.tree.map(jnp.add, acc, (weighted, acc_n, grads)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
    (loss, acc_n, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
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


def score_index(arrays: dict, stop_ids) -> np.ndarray:
  """Where the RM reads each demonstration [N]: its first stop id among the completion
  tokens — where PPO's rollout stops and where the comparison rows end (`data.stop_ids`:
  EOS, or a chat template's end of turn) — else its last token."""
  mask = arrays["attention_mask"].astype(bool)
  is_stop = np.isin(arrays["input_ids"], np.asarray(list(stop_ids))) & mask & \
      arrays["loss_mask"].astype(bool)
  last = mask.sum(-1) - 1
  return np.where(is_stop.any(-1), is_stop.argmax(-1), last).astype(np.int32)


def measure_normalization(cfg, params, mesh, arrays, batch_size: int, gain: bool,
                          stop_ids) -> dict:
  """Mean (and std) of raw rewards over every demonstration, read at `score_index`.

  The last global batch is padded with copies of the last row, and the copies' scores are
  dropped, so no demonstration is left out.
  """
  fn = jax.jit(lambda p, ids, m, idx: models.scores(cfg, p, ids, m, idx))
  n = len(arrays["input_ids"])
  index = score_index(arrays, stop_ids)
  per_host = batch_size // jax.process_count()
  scores = []
  for start in range(0, n, batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), n - 1)
    rows = rows[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
    batch = sharding.host_to_global(mesh, dict(ids=arrays["input_ids"][rows],
                                               mask=arrays["attention_mask"][rows],
                                               last=index[rows]))
    got = np.asarray(jax.device_get(jax.experimental.multihost_utils.process_allgather(
        fn(params, batch["ids"], batch["mask"], batch["last"]), tiled=True)))
    scores.append(got[:min(batch_size, n - start)])
  values = np.concatenate(scores)
  return dict(mean=float(values.mean()), std=float(values.std() + 1e-8), gain=bool(gain),
              n=int(values.size))


def load_demonstrations(config, tokenizer, train_data):
  """The `data.norm` demonstrations the normalisation is measured on (None: `rm.normalize`
  is 'none'); same chat / plain format as the comparisons, or a clear error."""
  if config.rm.normalize == "none":
    return None
  demos = data.load_sft(batching.spec_from_config(config.data.norm), tokenizer,
                        config.data.max_prompt_len, config.data.max_len)
  log.info("[rm] normalisation data: %s", demos.report)
  if len(demos.arrays["input_ids"]) < 2:
    raise UserError(f"data.norm.path={config.data.norm.path}: "
                    f"{len(demos.arrays['input_ids'])} usable demonstrations; the reward "
                    "normalisation needs at least 2 (or set --config.rm.normalize=none)")
  if demos.format != train_data.format:
    raise UserError(f"data.norm.path={config.data.norm.path} holds {demos.format} rows but "
                    f"data.train.path={config.data.train.path} holds {train_data.format} "
                    "rows: the reward model must be trained and normalised on the format PPO "
                    "will score (chat messages through the template, or plain text) — use "
                    "one format for both")
  return demos


def stop_ids_of(config, tokenizer) -> list:
  """What PPO will stop sampling on (`data.stop_ids`): where the RM reads a response."""
  init_dir = workdir_lib.resolve_model_dir(config.model.init_from, "scalar") \
      if config.model.init_from else None
  return data.stop_ids(tokenizer, init_dir)


def load_data(config, tokenizer, split_cfg):
  return batching.load("comparisons", batching.spec_from_config(split_cfg), tokenizer,
                       max_prompt_len=config.data.max_prompt_len,
                       max_len=config.data.max_len, k_max=config.rm.k_max,
                       stop_ids=stop_ids_of(config, tokenizer))


def build(config, mesh, model: Model, total_steps: int) -> single_model.Parts:
  """The RM state and jitted steps for `model` (bench/ and tests call this too)."""
  return single_model.build(config, mesh, model, total_steps, make_train_step, make_eval_step)


step = single_model.step   # (parts, state, host batch) -> (state, metrics)


def export_with_normalization(config, parts: single_model.Parts, tokenizer, params,
                              workdir: str, demos=None, stop_ids=(), data_format="plain"
                              ) -> str:
  """Measures the normalisation on `demos` (none: identity) and exports the RM with it.

  The normalisation file also records the data format the RM was trained on, which PPO
  checks its prompts against.
  """
  cfg = parts.model.cfg
  norm = dict(mean=0.0, std=1.0, gain=False, n=0)
  if demos is not None:
    norm = measure_normalization(cfg, params, parts.mesh, demos.arrays,
                                 config.train.batch_size,
                                 gain=config.rm.normalize == "bias_gain", stop_ids=stop_ids)
    log.info("[rm] reward normalisation from %d demonstrations: mean %.4f std %.4f",
             norm["n"], norm["mean"], norm["std"])
  # HF's `score` layer has no bias: fold ours into the normalisation's mean, so the exported
  # model gives the same normalised rewards in transformers as here.
  params = dict(params, head=dict(params["head"]))
  bias = float(np.asarray(jax.device_get(params["head"]["bias"])).reshape(-1)[0])
  params["head"]["bias"] = jnp.zeros_like(params["head"]["bias"])
  norm = dict(norm, mean=norm["mean"] - bias, format=data_format)
  return workdir_lib.export(workdir, cfg, params, tokenizer, "scalar", normalization=norm)


def train(config, workdir: str) -> dict:
  """Trains the reward model; exports it with its normalisation to `<workdir>/export`."""
  inputs, parts = single_model.start(config, "scalar", functools.partial(load_data, config),
                                     build)
  demos = load_demonstrations(config, inputs.tokenizer, inputs.train_data)

  def finish(state):
    out = export_with_normalization(config, parts, inputs.tokenizer, state["params"], workdir,
                                    demos, stop_ids_of(config, inputs.tokenizer),
                                    inputs.train_data.format)
    log.info("[rm] exported reward model to %s", out)

  def summarize(sums):
    loss, acc, count = sums
    return dict(loss=loss / max(count, 1.0), accuracy=acc / max(count, 1.0))

  return single_model.run(
      parts, inputs, config, workdir, BUCKET_KEYS, summarize, finish, "reward_model",
      dict(global_batch=config.train.batch_size, k_max=config.rm.k_max,
           grad_accum=config.train.grad_accum, seq_len=config.data.max_len,
           steps=parts.total_steps, prompts=inputs.n_rows))
