"""The built-in task's own settings, and the declarative table of its stages.

`task_settings(variant)` is the `pipeline` block the launcher configs (`configs/*.py`) carry:
the world's size and mix, dataset sizes, and each stage's steps and learning rate. The stage
trainers never see it: `STAGES` below says, field by field, what each stage's config gets;
`stage_config` applies it; `replaced_overrides` names any field the user set on the command
line that a stage replaces, so nothing is silently ignored.
"""

from __future__ import annotations

import copy
import os

import ml_collections

from rlhf_jax import config as config_lib

# Lengths of the built-in task (prompts are short instructions, answers a few words).
MAX_PROMPT_LEN = 24
MAX_NEW_TOKENS = 16
MAX_LEN = MAX_PROMPT_LEN + MAX_NEW_TOKENS


def task_settings(variant=None) -> ml_collections.ConfigDict:
  """The `pipeline` block: the built-in task's world and its stages' sizes."""
  s = ml_collections.ConfigDict(dict(
      n_letters=6, max_args=5,             # the world: letters a.., 2..max_args per prompt
      p_correct=0.2, p_ramble=0.25, p_unsafe=0.15,  # corpus mix (+ filler .15, wrong .12,
                                                     #  invented .13): how misaligned the base is
      corpus_docs=20000, demonstrations=300, rm_prompts=16000, k=4, eval_prompts=256,
      rm_eval_prompts=200, labeler_temperature=0.05,
      pretrain_steps=2000, pretrain_lr=3e-3,
      sft_steps=10, sft_lr=1e-4,
      rm_steps=1000, rm_lr=5e-4,
      ppo_iterations=200, ppo_lr=1e-4, ppo_batch_size=64,
      dpo_steps=250, dpo_lr=5e-5,   # configs/dpo.py: on the RM's rankings, from SFT
      compare_no_ptx=True,    # also train plain PPO to measure the alignment tax
      evaluate=True,
  ))
  if "tiny" in config_lib.variants(variant):
    s.corpus_docs, s.demonstrations, s.rm_prompts = 600, 48, 48
    s.eval_prompts, s.rm_eval_prompts, s.k = 32, 16, 3
    s.pretrain_steps, s.sft_steps, s.rm_steps, s.ppo_iterations = 6, 4, 4, 3
    s.dpo_steps = 4
    s.ppo_batch_size = 16
  return s


# Fields every stage takes from the user's config as given; the PPO stages also take the
# whole `ppo` and `optim` blocks (then set the few fields their rows below name).
INHERITED = ("seed", "mesh", "sharding_rules", "model.dtype", "model.remat", "model.dropout",
             "model.attention_dropout",
             "train.progress", "train.eval_batches")
PPO_INHERITED = ("ppo", "optim")


class Setting(str):
  """A value read from the `pipeline` block (`task_settings`)."""


class File(str):
  """A file of the task's data directory."""


class StageDir(str):
  """The workdir of an earlier stage of the pipeline."""


def _batch(c):
  return 32 if c.train.batch_size >= 32 else c.train.batch_size


COMMON = {
    "task": "",
    "tokenizer": File("tokenizer"),
    "data.max_prompt_len": MAX_PROMPT_LEN,
    "data.max_len": MAX_LEN,
    "train.batch_size": _batch,
    "train.log_every": lambda c: min(c.train.log_every, 10),
}

# stage -> (config schema, {field: value}); a value is a literal, a Setting / File / StageDir,
# or a function of the user's config.
STAGES = {
    "pretrain": ("pretrain", {
        "model.preset": lambda c: c.model.preset,
        "data.train.path": File("pretrain.jsonl"), "data.eval.path": File("pretrain_eval.jsonl"),
        "train.steps": Setting("pretrain_steps"), "optim.lr": Setting("pretrain_lr"),
        "optim.warmup_steps": 20,
        "train.batch_size": lambda c: c.train.batch_size if c.train.batch_size < 32 else 64}),
    "sft": ("sft", {
        "model.init_from": StageDir("pretrain"),
        "data.train.path": File("sft_train.jsonl"), "data.eval.path": File("sft_eval.jsonl"),
        "train.steps": Setting("sft_steps"), "optim.lr": Setting("sft_lr"),
        "optim.warmup_steps": 10}),
    "rm": ("rm", {
        "model.init_from": StageDir("sft"), "rm.k_max": Setting("k"),
        "data.train.path": File("comparisons_train.jsonl"),
        "data.eval.path": File("comparisons_eval.jsonl"), "data.norm.path": File("sft_train.jsonl"),
        "train.steps": Setting("rm_steps"), "optim.lr": Setting("rm_lr"),
        "optim.warmup_steps": 10}),
    "ppo": ("ppo", {
        "model.init_from": StageDir("sft"), "ppo.reward_from": StageDir("rm"),
        "data.train.path": File("prompts_train.jsonl"), "data.eval.path": File("prompts_eval.jsonl"),
        "data.ptx.path": File("pretrain.jsonl"),
        "ppo.iterations": Setting("ppo_iterations"), "optim.lr": Setting("ppo_lr"),
        "train.batch_size": Setting("ppo_batch_size"),
        "ppo.max_new_tokens": lambda c: min(c.ppo.max_new_tokens, MAX_NEW_TOKENS),
        "train.log_every": 1}),
}
STAGES["ppo_noptx"] = ("ppo", dict(STAGES["ppo"][1], **{"ppo.ptx_coef": 0.0}))
# GRPO / RLOO / REINFORCE++ (configs/grpo.py) in PPO's place: PPO's rows, with as many
# responses per rollout as PPO samples (ppo_batch_size / grpo.group_size prompts).
STAGES["grpo"] = ("grpo", dict(STAGES["ppo"][1], **{
    "train.batch_size": lambda c: max(c.pipeline.ppo_batch_size // c.grpo.group_size, 1)}))
STAGES["dpo"] = ("dpo", {
    "model.init_from": StageDir("sft"), "dpo.k_max": Setting("k"),
    "data.train.path": File("comparisons_train.jsonl"),
    "data.eval.path": File("comparisons_eval.jsonl"),
    "train.steps": Setting("dpo_steps"), "optim.lr": Setting("dpo_lr"),
    "optim.warmup_steps": 10})

SCHEMAS = {"pretrain": lambda: config_lib.sft_config("pretrain"), "sft": config_lib.sft_config,
           "rm": config_lib.rm_config, "ppo": config_lib.ppo_config,
           "dpo": config_lib.dpo_config, "grpo": config_lib.grpo_config}


def _set(c, path: str, value) -> None:
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


def _get(c, path: str):
  node = c
  for p in path.split("."):
    node = node[p]
  return node


def _has(c, path: str) -> bool:
  try:
    _get(c, path)
  except (KeyError, AttributeError, TypeError):
    return False
  return True


def stage_config(stage: str, config, settings, workdir: str, task_dir: str):
  """The full config of one stage of the built-in pipeline (validated when it runs: its
  paths exist only once the stages before it have finished)."""
  schema, rows = STAGES[stage]
  c = SCHEMAS[schema]()
  inherited = INHERITED + (PPO_INHERITED if schema == "ppo" else ()) + \
      (("dpo",) if schema == "dpo" else ()) + \
      (PPO_INHERITED + ("grpo",) if schema == "grpo" else ())  # + the user's estimator, G
  for path in inherited:
    _set(c, path, copy.deepcopy(_get(config, path)))   # the user's config stays as given
  for path, value in list(COMMON.items()) + list(rows.items()):
    if isinstance(value, Setting):
      value = settings[value]
    elif isinstance(value, File):
      value = os.path.join(task_dir, value)
    elif isinstance(value, StageDir):
      value = os.path.join(workdir, value)
    elif callable(value):
      value = value(config)
    _set(c, path, value)
  c.train.ckpt_every = max(c.train.steps, c.ppo.iterations if "ppo" in c else 0) // 2 or 1
  return c


def replaced_overrides(config, stage_configs: dict, overridden) -> list:
  """'field=value (stage: value, ...)' for each command-line override a stage replaces."""
  out = []
  for path in overridden:
    if path.split(".")[0] in ("pipeline", "stage") or not _has(config, path):
      continue
    mine = _get(config, path)
    used = {name: _get(c, path) for name, c in stage_configs.items()
            if _has(c, path) and _get(c, path) != mine}
    if used:
      out.append(f"{path}={mine!r} (" + ", ".join(f"{n}: {v!r}" for n, v in used.items())
                 + ")")
  return out
