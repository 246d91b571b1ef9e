"""Stage configs of the embedded pipeline, the task data, and the oracle's rankings."""

from __future__ import annotations

import copy
import json
import logging
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib

log = logging.getLogger("rlhf_jax")

# Lengths of the built-in task (prompts are short instructions, answers a few words).
MAX_PROMPT_LEN = 24
MAX_NEW_TOKENS = 16
MAX_LEN = MAX_PROMPT_LEN + MAX_NEW_TOKENS


def _done(stage_dir: str) -> bool:
  return os.path.isfile(os.path.join(stage_dir, "export", "DONE"))


def _mark_done(stage_dir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "export", "DONE"), "w") as f:
      f.write("ok\n")


def prepare_task_data(config, workdir: str) -> str:
  """Writes the task's tokenizer and jsonl datasets once per workdir."""
  from rlhf_jax import tasks
  task_dir = os.path.join(workdir, "task_data")
  marker = os.path.join(task_dir, "DONE")
  if os.path.isfile(marker):
    return task_dir
  log.info("[pipeline] writing the built-in task's data to %s", task_dir)
  os.makedirs(task_dir, exist_ok=True)
  pc = config.pipeline
  if jax.process_index() == 0:
    tasks.build_tokenizer().save_pretrained(os.path.join(task_dir, "tokenizer"))
    world = task_config(config)
    tasks.write_datasets(task_dir, seed=config.seed, config=world, sizes=dict(
        pretrain=pc.corpus_docs, sft_train=pc.demonstrations,
        sft_eval=max(pc.demonstrations // 4, 32),
        prompts_train=max(pc.rm_prompts, 512), prompts_eval=pc.eval_prompts))
    # Held-out documents of the same corpus: the "alignment tax" is measured on these.
    held_out = tasks.pretraining_corpus(config.seed + 1000, max(pc.corpus_docs // 20, 64),
                                        config=world)
    with open(os.path.join(task_dir, "pretrain_eval.jsonl"), "w") as f:
      for text in held_out:
        f.write(json.dumps(dict(text=text)) + "\n")
    with open(marker, "w") as f:
      f.write("ok\n")
  return task_dir


def task_config(config):
  """The built-in world: its letters, lengths and how misaligned the corpus is."""
  from rlhf_jax import tasks
  pc = config.pipeline
  return tasks.TaskConfig(
      n_letters=pc.n_letters, max_len=pc.max_args, p_filler=0.15, p_correct=pc.p_correct,
      p_wrong=0.12, p_ramble=pc.p_ramble, p_invented=0.13, p_unsafe=pc.p_unsafe)


def _common(c, config, stage: str, task_dir: str):
  """Copies what every stage shares from the user's config."""
  c.stage = stage
  c.task = ""
  c.seed = config.seed
  c.mesh = copy.deepcopy(config.mesh)
  c.sharding_rules = config.sharding_rules
  c.model.dtype = config.model.dtype
  c.model.remat = config.model.remat
  c.tokenizer = os.path.join(task_dir, "tokenizer")
  c.data.max_prompt_len = MAX_PROMPT_LEN
  c.data.max_len = MAX_LEN
  c.train.progress = config.train.progress
  c.train.batch_size = 32 if config.train.batch_size >= 32 else config.train.batch_size
  c.train.log_every = min(config.train.log_every, 10)
  c.train.eval_batches = config.train.eval_batches
  return c


def stage_config(stage: str, config, workdir: str, task_dir: str):
  """The full config of one stage of the embedded pipeline."""
  pc = config.pipeline
  path = lambda name: os.path.join(task_dir, name)  # noqa: E731
  if stage == "pretrain":
    c = _common(config_lib.sft_config("pretrain"), config, stage, task_dir)
    c.model.preset = config.model.preset
    c.data.train.path = path("pretrain.jsonl")
    c.data.eval.path = path("pretrain_eval.jsonl")
    c.train.steps, c.optim.lr, c.optim.warmup_steps = pc.pretrain_steps, pc.pretrain_lr, 20
    c.train.batch_size = config.train.batch_size if config.train.batch_size < 32 else 64
  elif stage == "sft":
    c = _common(config_lib.sft_config("sft"), config, stage, task_dir)
    c.model.init_from = os.path.join(workdir, "pretrain")
    c.data.train.path = path("sft_train.jsonl")
    c.data.eval.path = path("sft_eval.jsonl")
    c.train.steps, c.optim.lr, c.optim.warmup_steps = pc.sft_steps, pc.sft_lr, 10
  elif stage == "rm":
    c = _common(config_lib.rm_config(), config, stage, task_dir)
    c.model.init_from = os.path.join(workdir, "sft")
    c.rm.k_max = pc.k
    c.data.train.path = path("comparisons_train.jsonl")
    c.data.eval.path = path("comparisons_eval.jsonl")
    c.data.norm.path = path("sft_train.jsonl")
    c.train.steps, c.optim.lr, c.optim.warmup_steps = pc.rm_steps, pc.rm_lr, 10
  elif stage in ("ppo", "ppo_noptx"):
    c = config_lib.ppo_config()
    c.ppo = copy.deepcopy(config.ppo)      # the user's config stays as it was given
    c.optim = copy.deepcopy(config.optim)
    c = _common(c, config, "ppo", task_dir)
    c.model.init_from = os.path.join(workdir, "sft")
    c.ppo.reward_from = os.path.join(workdir, "rm")
    c.data.train.path = path("prompts_train.jsonl")
    c.data.eval.path = path("prompts_eval.jsonl")
    c.data.ptx.path = path("pretrain.jsonl")
    c.ppo.iterations = pc.ppo_iterations
    c.optim.lr = pc.ppo_lr
    c.train.batch_size = pc.ppo_batch_size
    c.ppo.max_new_tokens = min(config.ppo.max_new_tokens, MAX_NEW_TOKENS)
    c.train.log_every = 1
    if stage == "ppo_noptx":
      c.ppo.ptx_coef = 0.0
  else:
    raise ValueError(stage)
  c.train.ckpt_every = max(c.train.steps, c.ppo.iterations if "ppo" in c else 0) // 2 or 1
  config_lib.validate(c)
  return c


def run_stage(stage: str, config, workdir: str, task_dir: str) -> dict:
  from rlhf_jax.trainers import ppo, rm, sft
  stage_dir = os.path.join(workdir, stage)
  if _done(stage_dir):
    log.info("[pipeline] %s: reusing %s", stage, stage_dir)
    return {}
  log.info("[pipeline] %s: training in %s", stage, stage_dir)
  c = stage_config(stage, config, workdir, task_dir)
  module = {"pretrain": sft, "sft": sft, "rm": rm, "ppo": ppo, "ppo_noptx": ppo}[stage]
  result = module.train_stage(c, stage_dir)
  if not result.get("preempted"):
    _mark_done(stage_dir)
  return result


def collect_rankings(config, workdir: str, task_dir: str) -> None:
  """K SFT samples per prompt, ranked by the hidden oracle labeler (with its noise)."""
  from rlhf_jax import data, tasks
  from rlhf_jax.pipeline import generation
  from rlhf_jax.trainers import setup
  out_train = os.path.join(task_dir, "comparisons_train.jsonl")
  out_eval = os.path.join(task_dir, "comparisons_eval.jsonl")
  if os.path.isfile(out_train) and os.path.isfile(out_eval):
    return
  pc = config.pipeline
  policy_dir = setup.resolve_model_dir(os.path.join(workdir, "sft"), "causal")
  cfg, params = generation.load_policy(policy_dir)
  tokenizer = setup.load_tokenizer(stage_config("sft", config, workdir, task_dir), None)
  oracle = tasks.Oracle(seed=config.seed, noise=pc.labeler_temperature)
  rng = np.random.default_rng(config.seed)
  log.info("[pipeline] labeling: %d + %d prompts x K=%d SFT samples ranked by the oracle",
           pc.rm_prompts, pc.rm_eval_prompts, pc.k)
  for split, n, out in (("train", pc.rm_prompts, out_train),
                        ("eval", pc.rm_eval_prompts, out_eval)):
    spec = data.DataSpec(path=os.path.join(task_dir, f"prompts_{split}.jsonl"))
    prompts = data.load_prompts(spec, tokenizer, MAX_PROMPT_LEN)
    ids = np.repeat(prompts.arrays["input_ids"][:n], pc.k, axis=0)
    mask = np.repeat(prompts.arrays["attention_mask"][:n], pc.k, axis=0)
    resp = generation.generate_responses(
        cfg, params, tokenizer, ids, mask, jax.random.PRNGKey(config.seed + 7 + len(split)),
        max_new_tokens=MAX_NEW_TOKENS, batch_size=64)
    rows = []
    for i, prompt in enumerate(prompts.texts[:n]):
      responses = resp.texts[i * pc.k:(i + 1) * pc.k]
      finished = [bool(x) for x in resp.has_eos[i * pc.k:(i + 1) * pc.k]]
      ranks = tie_identical(responses, finished, oracle.rank(prompt, responses, rng,
                                                              finished=finished))
      rows.append(dict(prompt=prompt, responses=responses, ranks=[int(r) for r in ranks],
                       finished=finished))
    if jax.process_index() == 0:
      with open(out + ".tmp", "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
      os.replace(out + ".tmp", out)


def tie_identical(responses, finished, ranks) -> list:
  """Identical responses get one rank (the best they drew): a labeler can't prefer a copy.

  The oracle's Plackett–Luce noise orders equal scores at random; left as they are, pairs of
  identical texts would be label noise for the RM. Tied pairs are dropped by the loss.
  """
  best: dict = {}
  for text, fin, rank in zip(responses, finished, ranks):
    best[(text, fin)] = min(best.get((text, fin), rank), int(rank))
  return [best[(text, fin)] for text, fin in zip(responses, finished)]
