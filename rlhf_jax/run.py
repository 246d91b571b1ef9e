"""The one place that decides what a command runs: the built-in pipeline or a stage's trainer.

    launch/train.py -> run.run(config, workdir) -> pipeline.run_until (config.task='default')
                                                -> trainers.<stage>.train (your own data)
"""

from __future__ import annotations

import logging

from rlhf_jax import config as config_lib
from rlhf_jax.trainers import batching, dpo, grpo, ppo, rm, sft

log = logging.getLogger("rlhf_jax")

# Setting any of these on the command line means "my data", not the built-in task.
USER_DATA_FIELDS = ("data.train.path", "model.init_from", "ppo.reward_from")
# config.stage -> the trainer module that trains it
TRAINERS = {"pretrain": sft, "sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo, "grpo": grpo}


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
  given = [f for f in USER_DATA_FIELDS if f in overridden]
  if config.task == "default" and given and "task" not in overridden:
    log.info("[run] --config.%s given: training on your data (config.task='')", given[0])
    config.task = ""
  config_lib.validate(config)
  batching.use_workdir_cache(workdir)
  if config.task == "default":
    from rlhf_jax import pipeline
    return pipeline.run_until(config.stage, config, workdir, overridden)
  return TRAINERS[config.stage].train(config, workdir) or {}
