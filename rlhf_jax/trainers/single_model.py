"""The wiring SFT (and pretraining) and the reward model share: one model, one optimiser.

Both stages load a tokenizer, train and eval data, build one model's state and jitted
train / eval steps over the mesh, and hand the host loop a `loop.Stage`. Only the data
loader, the step builders, what evaluation reports and what `finish` exports differ; those
come in as arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import jax
import numpy as np

from rlhf_jax import models, optim, sharding
from rlhf_jax.trainers import batching, loop, setup
from rlhf_jax.trainers import state as state_lib

log = logging.getLogger("rlhf_jax")


@dataclasses.dataclass
class Wiring:
  """What a single-model stage built, for its own `evaluate` / `finish` closures."""
  mesh: Any
  tokenizer: Any
  cfg: Any
  n_params: int          # parameters of the model (for the start-up announcement)
  source: str            # where they came from
  train_data: Any
  eval_data: Optional[Any]
  total_steps: int
  init_state: Callable
  abstract_state: Any
  step_fn: Callable      # jitted (state, global batch) -> (state, metrics), state donated
  eval_fn: Callable      # jitted (params, global batch) -> tuple of summable arrays
  iterator: Any
  bucketing: Any         # data.Bucketing of the train and eval batches, or None


def prepare(config, kind: str, load_data: Callable, make_train_step: Callable,
            make_eval_step: Callable, bucket_keys: tuple) -> Wiring:
  """Mesh, tokenizer, data, initial model, state and jitted steps of one stage.

  Args:
    config: the stage's config.
    kind: "causal" (SFT / pretrain) or "scalar" (reward model).
    load_data: (tokenizer, split config) -> a loaded dataset with `.arrays` and `.report`.
    make_train_step: (cfg, tx, grad_accum) -> step(state, batch) -> (state, metrics).
    make_eval_step: cfg -> step(params, batch) -> tuple of arrays summed over eval batches.
    bucket_keys: the (right-padded) arrays cut to a length bucket (`data.bucket_min_len`).
  """
  mesh = setup.make_mesh(config)
  batching.check_batch_split(mesh, config.train.batch_size)
  rules = state_lib.parse_rules(config.sharding_rules)
  init_dir = setup.resolve_model_dir(config.model.init_from, kind) \
      if config.model.init_from else None
  tokenizer = setup.load_tokenizer(config, init_dir)
  train_data = load_data(tokenizer, config.data.train)
  log.info("[%s] train data: %s", config.stage, train_data.report)
  eval_data = None
  if config.data.eval.path:
    eval_data = load_data(tokenizer, config.data.eval)
    log.info("[%s] eval data: %s", config.stage, eval_data.report)

  cfg, params, p_shard, source = setup.initial_model(
      config, mesh, rules, kind, config.model.init_from, tokenizer=tokenizer)
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
  bucketing = batching.length_bucketing(config, bucket_keys)
  it = batching.iterator(train_data.arrays, config.train.batch_size, config.seed, bucketing)
  return Wiring(mesh=mesh, tokenizer=tokenizer, cfg=cfg,
                n_params=models.param_count(params), source=source,
                train_data=train_data, eval_data=eval_data, total_steps=total_steps,
                init_state=init_state, abstract_state=abstract_state, step_fn=step_fn,
                eval_fn=eval_fn, iterator=it, bucketing=bucketing)


def eval_sums(w: Wiring, config, params) -> Optional[np.ndarray]:
  """Element-wise sums of `eval_fn`'s outputs over the eval batches (None: no eval data)."""
  if w.eval_data is None:
    return None
  total = None
  for batch in batching.eval_batches(w.eval_data.arrays, config.train.batch_size,
                                     config.train.eval_batches, w.bucketing):
    out = np.asarray([float(x) for x in w.eval_fn(params, sharding.host_to_global(w.mesh, batch))])
    total = out if total is None else total + out
  return total


def run(w: Wiring, config, workdir: str, model_name: str, evaluate: Callable,
        finish: Callable, batch_info: dict) -> dict:
  """Announces the stage and runs the host loop to completion."""
  def step(state, _):
    return w.step_fn(state, sharding.host_to_global(w.mesh, next(w.iterator)))

  setup.announce(config.stage, w.mesh, {model_name: w.source},
                 {model_name: w.n_params}, batch_info)
  stage = loop.Stage(name=config.stage, total_steps=w.total_steps, init_state=w.init_state,
                     abstract_state=w.abstract_state, step=step, evaluate=evaluate,
                     data_state=w.iterator.state, restore_data_state=w.iterator.restore,
                     finish=finish)
  return loop.run(stage, workdir, config.train)
