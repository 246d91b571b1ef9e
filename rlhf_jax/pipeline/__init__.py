"""The embedded default: the whole InstructGPT pipeline on the built-in task, no downloads.

`run_until(stage, config, workdir)` runs every stage up to `stage` in its own sub-workdir,
announcing each and reusing any that already finished (its `export/DONE` exists):

    <workdir>/task_data/   tokenizer, corpus, demonstrations, prompts, oracle rankings (jsonl)
    <workdir>/pretrain/    the "pretrained" base model (misaligned, like GPT-3)
    <workdir>/sft/         step 1
    <workdir>/rm/          step 2 (on K-way rankings of SFT samples by the hidden oracle)
    <workdir>/ppo/         step 3, PPO-ptx
    <workdir>/ppo_noptx/   plain PPO, for the alignment-tax comparison
    <workdir>/grpo/        configs/grpo.py: GRPO / RLOO / REINFORCE++ in PPO's place
    <workdir>/dpo/         configs/dpo.py: DPO from SFT on the oracle's rankings (no RM, no PPO)
    <workdir>/eval.json, report.md, *.png   the paper-style evaluation

Each stage's config comes from the declarative table in `settings.STAGES`; the trainers see
only those configs and the jsonl files, through the same loaders as real datasets. The
oracle is used only to label rankings and to evaluate.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("rlhf_jax")

ORDER = ("pretrain", "sft", "rm", "ppo")
# Offline methods train on the oracle's rankings straight from SFT: their own stage lists.
OFFLINE = {"dpo": ("pretrain", "sft", "dpo")}
# Critic-free online RL (configs/grpo.py) in PPO's place, against the same RM; evaluated
# against SFT as PPO is.
ONLINE = {"grpo": ("pretrain", "sft", "rm", "grpo")}


def run_until(target: str, config, workdir: str, overridden=()) -> dict:
  """Runs the built-in pipeline through `target`; evaluates after PPO.

  Args:
    target: the last stage ("pretrain", "sft", "rm" or "ppo"), or a method of `OFFLINE` /
      `ONLINE`, which runs its own stage list and is evaluated against SFT as PPO is.
    config: the launcher's config; its `pipeline` block (default `settings.task_settings()`)
      sizes the task, and the fields in `settings.INHERITED` reach every stage.
    workdir: the run directory; each stage trains in a sub-directory.
    overridden: fields set on the command line; those a stage replaces are logged.
  """
  from rlhf_jax.pipeline import settings as settings_lib
  from rlhf_jax.pipeline import stages
  task = config.pipeline if "pipeline" in config else settings_lib.task_settings()
  names = list(OFFLINE[target]) if target in OFFLINE else \
      list(ONLINE[target]) if target in ONLINE else list(ORDER[:ORDER.index(target) + 1])
  if target == "ppo" and task.compare_no_ptx:
    names.append("ppo_noptx")
  task_dir = os.path.join(workdir, "task_data")
  stage_configs = {name: settings_lib.stage_config(name, config, task, workdir, task_dir)
                   for name in names}
  for line in settings_lib.replaced_overrides(config, stage_configs, overridden):
    log.warning("[pipeline] --config.%s is replaced by the built-in task's stages; change "
                "the task with --config.pipeline.*, or train on your own data with "
                "--config.task=", line)
  os.makedirs(workdir, exist_ok=True)
  stages.prepare_task_data(task, config.seed, task_dir)
  result: dict = {}
  for name in names:
    if name in ("rm", "dpo"):   # the same rankings the RM is trained on
      stages.collect_rankings(task, config.seed, workdir, task_dir)
    result = stages.run_stage(name, stage_configs[name], os.path.join(workdir, name))
    if result.get("preempted"):
      return result
  if (target == "ppo" or target in ONLINE or target in OFFLINE) and task.evaluate:
    from rlhf_jax.pipeline import evaluation
    # Offline (DPO) policies are sampled as SFT is, at temperature 1: they have no rollouts.
    temperature = config.ppo.temperature if "ppo" in config else 1.0
    result = dict(result, **evaluation.evaluate(task, config.seed, temperature,
                                                workdir, task_dir, method=target))
  return result
