"""The embedded default: the whole InstructGPT pipeline on the built-in task, no downloads.

`run_until(stage, config, workdir)` runs every stage up to `stage` in its own sub-workdir,
announcing each and reusing any that already finished (its `export/` exists):

    <workdir>/task_data/   tokenizer, corpus, demonstrations, prompts, oracle rankings (jsonl)
    <workdir>/pretrain/    the "pretrained" base model (misaligned, like GPT-3)
    <workdir>/sft/         step 1
    <workdir>/rm/          step 2 (on K-way rankings of SFT samples by the hidden oracle)
    <workdir>/ppo/         step 3, PPO-ptx
    <workdir>/ppo_noptx/   plain PPO, for the alignment-tax comparison
    <workdir>/eval.json, report.md, *.png   the paper-style evaluation

The trainers see only the jsonl files, through the same loaders as real datasets; the
oracle is used only to label rankings and to evaluate.
"""

from __future__ import annotations

import logging
import os

from rlhf_jax.pipeline import stages

log = logging.getLogger("rlhf_jax")

ORDER = ("pretrain", "sft", "rm", "ppo")


def run_until(target: str, config, workdir: str) -> dict:
  """Runs the embedded pipeline through `target`; evaluates after PPO."""
  os.makedirs(workdir, exist_ok=True)
  task_dir = stages.prepare_task_data(config, workdir)
  result: dict = {}
  for stage in ORDER[:ORDER.index(target) + 1]:
    if stage == "rm":
      stages.collect_rankings(config, workdir, task_dir)
    result = stages.run_stage(stage, config, workdir, task_dir)
    if result.get("preempted"):
      return result
    if stage == "ppo" and config.pipeline.compare_no_ptx:
      result = stages.run_stage("ppo_noptx", config, workdir, task_dir)
      if result.get("preempted"):
        return result
  if target == "ppo" and config.pipeline.evaluate:
    from rlhf_jax.pipeline import evaluation
    result = dict(result, **evaluation.evaluate(config, workdir, task_dir))
  return result
