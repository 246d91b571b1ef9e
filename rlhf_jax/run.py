"""The one place that decides what a command runs: the built-in pipeline or a stage's trainer.

    launch/train.py -> run.run(config, workdir) -> pipeline.run_until (config.task='default')
                                                -> trainers.<stage>.train (your own data)
"""

from __future__ import annotations

from rlhf_jax import config as config_lib
from rlhf_jax.trainers import ppo, rm, sft

# config.stage -> the trainer module that trains it
TRAINERS = {"pretrain": sft, "sft": sft, "rm": rm, "ppo": ppo}


def run(config, workdir: str, overridden: tuple = ()) -> dict:
  """Validates `config`, then trains its stage (and, for the built-in task, the stages before).

  Args:
    config: a stage config (`configs/<stage>.py`).
    workdir: the run directory.
    overridden: the config fields the user set on the command line (`a.b`), so that the
      built-in pipeline can report the ones its stages replace.

  Returns:
    The last logged metrics (with "preempted" when a SIGTERM cut the run short).
  """
  config_lib.validate(config)
  if config.task == "default":
    from rlhf_jax import pipeline
    return pipeline.run_until(config.stage, config, workdir, overridden)
  return TRAINERS[config.stage].train(config, workdir) or {}
