"""The parts SFT (and pretraining) and the reward model share: one model, one optimiser.

`load_inputs` opens the mesh, tokenizer, train / eval data and the initial model; `build` turns a placed model into the state's shardings, its initial / abstract state and
the jitted train and eval steps; the stage modules (`sft`, `rm`) pass in their step
builders. `run` hands them to the host loop with the stage's data iterator, evaluation and
export.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable, Optional

import jax
import numpy as np

from rlhf_jax import models, optim, sharding
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import lora
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import batching, loop, model_init
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers.model_init import Model

log = logging.getLogger("rlhf_jax")


@dataclasses.dataclass
class Inputs:
  """What a single-model stage reads before it builds anything."""
  mesh: Any
  tokenizer: Any
  model: Model
  train_data: Any              # data.TokenArrays
  eval_data: Optional[Any]     # data.TokenArrays, or None without data.eval.path

  @property
  def n_rows(self) -> int:
    return len(self.train_data.arrays["input_ids"])


def load_inputs(config, kind: str, load_data: Callable) -> Inputs:
  """Mesh, tokenizer, datasets and initial model of a stage (in that order).

  Args:
    kind: "causal" (SFT / pretrain) or "scalar" (reward model).
    load_data: (tokenizer, split config) -> a loaded dataset with `.arrays` and `.report`.
  """
  mesh = model_init.make_mesh(config)
  batching.check_batch_split(mesh, config.train.batch_size)
  rules = state_lib.parse_rules(config.sharding_rules)
  init_dir = workdir_lib.resolve_model_dir(config.model.init_from, kind) \
      if config.model.init_from else None
  tokenizer = model_init.load_tokenizer(config, init_dir)
  train_data = load_data(tokenizer, config.data.train)
  log.info("[%s] train data: %s", config.stage, train_data.report)
  eval_data = None
  if config.data.eval.path:
    eval_data = load_data(tokenizer, config.data.eval)
    log.info("[%s] eval data: %s", config.stage, eval_data.report)
  model = model_init.initial_model(config, mesh, rules, kind, config.model.init_from,
                                   tokenizer=tokenizer)
  return Inputs(mesh, tokenizer, model, train_data, eval_data)


@dataclasses.dataclass
class Parts:
  """What a single-model stage runs: its model, state and jitted steps."""
  mesh: Any
  model: Model
  total_steps: int
  shardings: dict
  init_state: Callable         # () -> fresh state pytree (born sharded)
  abstract_state: Callable     # () -> ShapeDtypeStructs with shardings (restore target)
  step_fn: Callable            # jitted (state, global batch) -> (state, metrics), state donated
  eval_fn: Callable            # jitted (params, global batch) -> tuple of summable arrays
  # With LoRA (`model.lora.rank` > 0): its Spec; state["params"] is then the trainable tree
  # (`models.lora.init_trainable`) over the frozen base `model.params`.
  lora: Optional[Any] = None
  full_params: Optional[Callable] = None   # jitted state["params"] -> the model's params

  def model_params(self, params):
    """The model `params` (state["params"]) stand for: the merged model under LoRA."""
    return params if self.lora is None else self.full_params(params)


def start(config, kind: str, load_data: Callable, build_parts: Callable):
  """(inputs, parts) of a stage: `load_inputs`, then its `build` for the data's steps."""
  inputs = load_inputs(config, kind, load_data)
  parts = build_parts(config, inputs.mesh, inputs.model,
                      batching.total_steps(config.train, inputs.n_rows))
  return inputs, parts


def build(config, mesh, model: Model, total_steps: int, make_train_step: Callable,
          make_eval_step: Callable) -> Parts:
  """State and jitted steps of one model trained for `total_steps` updates.

  Args:
    make_train_step: (cfg, tx, grad_accum) -> step(state, batch) -> (state, metrics).
    make_eval_step: cfg -> step(params, batch) -> tuple of arrays summed over eval batches.
  """
  batching.check_batch_split(mesh, config.train.batch_size)
  tx = optim.make_optimizer(config.optim, total_steps)
  spec = lora.spec_from_config(config.model.get("lora"))
  if spec is not None:
    return _build_lora(config, mesh, model, total_steps, make_train_step, make_eval_step,
                       tx, spec)
  shardings, init_state, abstract_state = state_lib.build(
      mesh, config.seed, {"params": (model.params, model.shardings, tx)})
  batch_shard = sharding.batch_sharding(mesh, 1)
  step_fn = jax.jit(make_train_step(model.cfg, tx, config.train.grad_accum),
                    in_shardings=(shardings, batch_shard), out_shardings=(shardings, None),
                    donate_argnums=(0,))
  eval_fn = jax.jit(make_eval_step(model.cfg), in_shardings=(model.shardings, batch_shard))
  return Parts(mesh=mesh, model=model, total_steps=total_steps, shardings=shardings,
               init_state=init_state, abstract_state=abstract_state, step_fn=step_fn,
               eval_fn=eval_fn)


def _build_lora(config, mesh, model: Model, total_steps: int, make_train_step: Callable,
                make_eval_step: Callable, tx, spec) -> Parts:
  """`build` under LoRA: the state holds the adapters (and their optimiser state) only; the
  frozen base is a non-donated argument of the jitted steps, so it is never copied, never
  differentiated and never checkpointed (it is `model.init_from`)."""
  cfg, kind = model.cfg, models.kind_of(model.params)
  if "to_params" not in inspect.signature(make_train_step).parameters:
    raise ConfigError("model.lora.rank", spec.rank,
                      f"0 for stage {config.stage!r} (its trainer does not take LoRA)")
  trainable, t_shard = state_lib.lora_trainable(
      mesh, cfg, model.params, spec, state_lib.parse_rules(config.sharding_rules), config.seed)
  log.info("[%s] LoRA rank %d alpha %g on %s: %d trained params of %d", config.stage,
           spec.rank, spec.alpha, ",".join(s[1] for s in lora.sites(cfg, spec)),
           lora.count(cfg, spec, kind), models.param_count(model.params))
  shardings, init_state, abstract_state = state_lib.build(
      mesh, config.seed, {"params": (trainable, t_shard, tx)})
  batch_shard = sharding.batch_sharding(mesh, 1)
  merge = lambda base, t: lora.full_params(cfg, base, t, spec)  # noqa: E731

  def train_step(state, batch, base):
    return make_train_step(cfg, tx, config.train.grad_accum,
                           to_params=lambda t: merge(base, t))(state, batch)

  def eval_step(params, batch, base):
    return make_eval_step(cfg)(merge(base, params), batch)

  train_jit = jax.jit(train_step, in_shardings=(shardings, batch_shard, model.shardings),
                      out_shardings=(shardings, None), donate_argnums=(0,))
  eval_jit = jax.jit(eval_step, in_shardings=(t_shard, batch_shard, model.shardings))
  full_jit = jax.jit(merge, in_shardings=(model.shardings, t_shard),
                     out_shardings=model.shardings)
  return Parts(mesh=mesh, model=model, total_steps=total_steps, shardings=shardings,
               init_state=init_state, abstract_state=abstract_state,
               step_fn=lambda state, batch: train_jit(state, batch, model.params),
               eval_fn=lambda params, batch: eval_jit(params, batch, model.params),
               lora=spec, full_params=lambda params: full_jit(model.params, params))


def step(parts: Parts, state, batch):
  """One update on this host's slice of a global batch."""
  return parts.step_fn(state, sharding.host_to_global(parts.mesh, batch))


def eval_sums(parts: Parts, params, batches) -> Optional[np.ndarray]:
  """Element-wise sums of `eval_fn`'s outputs over host batches (None: no batches)."""
  total = None
  for batch in batches:
    out = np.asarray([float(x) for x in parts.eval_fn(
        params, sharding.host_to_global(parts.mesh, batch))])
    total = out if total is None else total + out
  return total


def run(parts: Parts, inputs: Inputs, config, workdir: str, bucket_keys: tuple,
        summarize_eval: Callable, finish: Callable, model_name: str, batch_info: dict) -> dict:
  """Announces the stage and runs the host loop to completion.

  Args:
    bucket_keys: the (right-padded) arrays cut to a length bucket (`data.bucket_min_len`).
    summarize_eval: the summed `eval_fn` outputs -> eval metrics.
    finish: (state) -> None, the export.
  """
  bucketing = batching.length_bucketing(config, bucket_keys)
  iterator = batching.iterator(inputs.train_data.arrays, config.train.batch_size, config.seed,
                               bucketing)

  def evaluate(state):
    if inputs.eval_data is None:
      return {}
    sums = eval_sums(parts, state["params"], batching.eval_batches(
        inputs.eval_data.arrays, config.train.batch_size, config.train.eval_batches, bucketing))
    return {} if sums is None else summarize_eval(sums)

  loop.announce(config.stage, parts.mesh, {model_name: parts.model}, batch_info)
  stage = loop.Stage(name=config.stage, total_steps=parts.total_steps,
                     init_state=parts.init_state, abstract_state=parts.abstract_state,
                     step=lambda state, _: step(parts, state, next(iterator)),
                     evaluate=evaluate, data_state=iterator.state,
                     restore_data_state=iterator.restore, finish=finish)
  return loop.run(stage, workdir, config.train)
