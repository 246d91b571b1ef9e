"""The host loop all stages share: resume, step, log, evaluate, checkpoint, preempt.

A stage supplies a `Stage` object: the initial state (born sharded), a host `step` that runs
its jitted function(s) on the next batch, an evaluator, its data position, and an export. The
loop owns everything that is the same across SFT, RM and PPO. Resume order: the latest good
checkpoint in `<workdir>/checkpoints`, else a fresh state (which the stage builds from
`model.init_from` or a preset).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm

from rlhf_jax import checkpoint, metrics, models
from rlhf_jax.errors import DivergenceError

log = logging.getLogger("rlhf_jax")


@dataclasses.dataclass
class Stage:
  """What one training stage plugs into the loop.

  Attributes:
    name: metrics `stage` field ("sft", "rm", "ppo", ...).
    total_steps: number of updates (PPO: iterations).
    init_state: builds the fresh state pytree (born sharded).
    abstract_state: ShapeDtypeStructs with shardings (restore target).
    step: host callable (state, step_index) -> (state, metrics dict of arrays/floats).
    evaluate: (state) -> metrics dict, or None.
    data_state / restore_data_state: the data position as JSON and back.
    finish: (state) -> None, called once at the end (export).
  """
  name: str
  total_steps: int
  init_state: Callable[[], Any]
  abstract_state: Callable[[], Any]
  step: Callable[[Any, int], tuple]
  evaluate: Optional[Callable[[Any], dict]] = None
  data_state: Callable[[], dict] = dict
  restore_data_state: Callable[[dict], None] = lambda d: None
  finish: Optional[Callable[[Any], None]] = None


class _Preemption:
  """SIGTERM (what TPU/GPU schedulers send) -> checkpoint at the next step boundary, exit 0."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):  # noqa: ARG001
      self.requested = True
      log.warning("SIGTERM received: will checkpoint at the next step boundary and exit.")
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _to_python(tree: dict) -> dict:
  out = {}
  for k, v in jax.device_get(tree).items():
    arr = np.asarray(v)
    out[k] = arr.item() if arr.size == 1 else arr.tolist()
  return out


def _has_final_eval(writer: metrics.MetricsWriter, stage: Stage) -> bool:
  """Whether metrics.jsonl already holds this stage's end-of-run eval record."""
  if not writer.enabled:
    return False
  return any(r.get("step") == stage.total_steps and any(k.startswith("eval/") for k in r)
             for r in metrics.read_metrics(writer.workdir, stage.name))


def announce(stage: str, mesh, loaded: dict, batch: dict) -> None:
  """One log line at a stage's start: mesh, where each model came from, the batch shape.

  Args:
    loaded: name -> `model_init.Model`.
  """
  parts = [f"[{stage}] mesh {dict(mesh.shape)} on {jax.device_count()} devices "
           f"({jax.process_count()} processes)"]
  parts += [f"{name}: {m.source} ({models.param_count(m.params) / 1e6:.2f}M params)"
            for name, m in loaded.items()]
  parts.append("batch " + ", ".join(f"{k}={v}" for k, v in batch.items()))
  log.info("; ".join(parts))


def run(stage: Stage, workdir: str, train_cfg) -> dict:
  """Runs `stage` to completion (or preemption). Returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=train_cfg.keep_checkpoints)
  restored = ckpt.restore_latest(stage.abstract_state())
  if restored is not None:
    state, extra = restored
    stage.restore_data_state(extra.get("data", {}))
    start = int(jax.device_get(state["step"]))
    log.info("[%s] resumed from %s at step %d", stage.name, ckpt.directory, start)
  else:
    state, start = stage.init_state(), 0
  writer = metrics.MetricsWriter(workdir, stage.name, resume_step=start)
  last: dict = {}
  window_start, window_steps = time.perf_counter(), 0
  bar = tqdm.tqdm(total=stage.total_steps, initial=start, desc=stage.name, unit="step",
                  disable=not (train_cfg.progress and jax.process_index() == 0),
                  dynamic_ncols=True, leave=False)
  preempted = False
  try:
    with _Preemption() as preemption:
      for step in range(start, stage.total_steps):
        state, step_metrics = stage.step(state, step)
        window_steps += 1
        bar.update(1)
        done = step + 1
        is_last = done == stage.total_steps
        # One scalar per step: N skips in a row must stop the run even between log steps.
        skips = int(jax.device_get(state["consecutive_skips"]))
        diverged = skips >= train_cfg.max_consecutive_skips
        if done % train_cfg.log_every == 0 or is_last or diverged:
          last = _to_python(step_metrics)
          last.update(_to_python(dict(consecutive_skips=state["consecutive_skips"],
                                      total_skips=state["total_skips"])))
          elapsed = time.perf_counter() - window_start
          last["steps_per_sec"] = window_steps / max(elapsed, 1e-9)
          window_start, window_steps = time.perf_counter(), 0
          if diverged:
            writer.write(done, last)
            raise DivergenceError(
                f"[{stage.name}] {skips} non-finite updates in a row at step {done} "
                f"(train.max_consecutive_skips={train_cfg.max_consecutive_skips}); "
                f"stopped without saving. The last good checkpoint in {ckpt.directory} "
                f"(step {ckpt.latest_step()}) is kept. Lower optim.lr or check the data.")
          if stage.evaluate is not None and train_cfg.eval_every and \
              done % train_cfg.eval_every == 0 and not is_last:
            last.update({f"eval/{k}": v for k, v in stage.evaluate(state).items()})
          writer.write(done, last)
          bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()
                           if k in ("loss", "score", "accuracy", "kl")})
        if preemption.requested or is_last or (
            train_cfg.ckpt_every and done % train_cfg.ckpt_every == 0):
          ckpt.save(done, state, extra=dict(data=stage.data_state()))
        if preemption.requested and not is_last:
          preempted = True
          log.warning("[%s] checkpointed step %d after SIGTERM; exiting.", stage.name, done)
          break
    if not preempted:
      if stage.evaluate is not None:
        # Every process evaluates (it may be collective); the record is written once: a
        # rerun of a finished run (or one killed after its final eval) does not repeat it.
        final_eval = {f"eval/{k}": v for k, v in stage.evaluate(state).items()}
        if final_eval and not _has_final_eval(writer, stage):
          writer.write(stage.total_steps, final_eval)
        last.update(final_eval)
      if stage.finish is not None:
        stage.finish(state)
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  last["preempted"] = preempted
  return last
