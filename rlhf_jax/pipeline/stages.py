"""The built-in pipeline's steps besides training: the task's data, the oracle's rankings,
and running one stage in its sub-workdir (reused once finished).

Multi-process runs (the workdir on a filesystem every host shares): process 0 alone writes
the task data, the rankings and the `DONE` markers; every process meets the others at a
`distributed.barrier` after each write, before anyone reads it. Whether a step is already
done is process 0's answer (`distributed.main_decides`), so that all processes take the same
path through the collectives of training. The oracle's rankings are sampled on every
process alike (each on its own first device, no collective) and written once.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import data, distributed, tasks
from rlhf_jax import workdir as workdir_lib
from rlhf_jax import generation
from rlhf_jax.pipeline.settings import MAX_NEW_TOKENS, MAX_PROMPT_LEN
from rlhf_jax.trainers import dpo, grpo, ppo, rm, sft

log = logging.getLogger("rlhf_jax")

# stage of the pipeline -> the trainer module that trains it
TRAINERS = {"pretrain": sft, "sft": sft, "rm": rm, "ppo": ppo, "ppo_noptx": ppo,
            "dpo": dpo, "grpo": grpo}


def _done(stage_dir: str) -> bool:
  """The stage finished in an earlier run (process 0's view, on every process)."""
  return distributed.main_decides(os.path.isfile(os.path.join(stage_dir, "export", "DONE")))


def _mark_done(stage_dir: str) -> None:
  if distributed.is_main_process():
    with open(os.path.join(stage_dir, "export", "DONE"), "w") as f:
      f.write("ok\n")


def prepare_task_data(settings, seed: int, task_dir: str) -> None:
  """Writes the task's tokenizer and jsonl datasets once per workdir."""
  marker = os.path.join(task_dir, "DONE")
  if distributed.main_decides(os.path.isfile(marker)):
    return
  log.info("[pipeline] writing the built-in task's data to %s", task_dir)
  pc = settings
  if distributed.is_main_process():
    os.makedirs(task_dir, exist_ok=True)
    tasks.build_tokenizer().save_pretrained(os.path.join(task_dir, "tokenizer"))
    world = task_config(settings)
    tasks.write_datasets(task_dir, seed=seed, config=world, sizes=dict(
        pretrain=pc.corpus_docs, sft_train=pc.demonstrations,
        sft_eval=max(pc.demonstrations // 4, 32),
        prompts_train=max(pc.rm_prompts, 512), prompts_eval=pc.eval_prompts))
    # Held-out documents of the same corpus: the "alignment tax" is measured on these.
    held_out = tasks.pretraining_corpus(seed + 1000, max(pc.corpus_docs // 20, 64),
                                        config=world)
    with open(os.path.join(task_dir, "pretrain_eval.jsonl"), "w") as f:
      for text in held_out:
        f.write(json.dumps(dict(text=text)) + "\n")
    with open(marker, "w") as f:
      f.write("ok\n")
  distributed.barrier("pipeline: task data written")


def task_config(settings):
  """The built-in world: its letters, lengths and how misaligned the corpus is."""
  pc = settings
  return tasks.TaskConfig(
      n_letters=pc.n_letters, max_len=pc.max_args, p_filler=0.15, p_correct=pc.p_correct,
      p_wrong=0.12, p_ramble=pc.p_ramble, p_invented=0.13, p_unsafe=pc.p_unsafe)


def run_stage(stage: str, stage_config, stage_dir: str) -> dict:
  """Trains one stage in `stage_dir` unless it already finished (its `export/DONE`)."""
  if _done(stage_dir):
    log.info("[pipeline] %s: reusing %s", stage, stage_dir)
    return {}
  log.info("[pipeline] %s: training in %s", stage, stage_dir)
  config_lib.validate(stage_config)
  result = TRAINERS[stage].train(stage_config, stage_dir)
  if not result.get("preempted"):
    _mark_done(stage_dir)
  # Process 0 writes the export after the others leave `train`; the next stage reads it.
  distributed.barrier(f"pipeline: {stage} exported")
  return result


def collect_rankings(settings, seed: int, workdir: str, task_dir: str) -> None:
  """K SFT samples per prompt, ranked by the hidden oracle labeler (with its noise)."""
  out_train = os.path.join(task_dir, "comparisons_train.jsonl")
  out_eval = os.path.join(task_dir, "comparisons_eval.jsonl")
  if distributed.main_decides(os.path.isfile(out_train) and os.path.isfile(out_eval)):
    return
  pc = settings
  tokenizer = workdir_lib.read_tokenizer(os.path.join(task_dir, "tokenizer"))
  splits = []
  for split, n, out in (("train", pc.rm_prompts, out_train),
                        ("eval", pc.rm_eval_prompts, out_eval)):
    spec = data.DataSpec(path=os.path.join(task_dir, f"prompts_{split}.jsonl"))
    prompts = data.load_prompts(spec, tokenizer, MAX_PROMPT_LEN)
    if len(prompts.texts) < n:   # never label fewer prompts than asked for
      field, sizes = (("rm_prompts", "sized by pipeline.rm_prompts") if split == "train" else
                      ("rm_eval_prompts", "sized by pipeline.eval_prompts, which must be >= "
                       "pipeline.rm_eval_prompts"))
      raise ValueError(f"--config.pipeline.{field}={n}: {spec.path} holds only "
                       f"{len(prompts.texts)} prompts ({sizes}, when this workdir's task data "
                       f"was first written); use a fresh --workdir or a smaller value")
    splits.append((split, n, out, prompts))
  policy_dir = workdir_lib.resolve_model_dir(os.path.join(workdir, "sft"), "causal")
  cfg, params = generation.load_policy(policy_dir)
  oracle = tasks.Oracle(seed=seed, noise=pc.labeler_temperature)
  rng = np.random.default_rng(seed)
  log.info("[pipeline] labeling: %d + %d prompts x K=%d SFT samples ranked by the oracle",
           pc.rm_prompts, pc.rm_eval_prompts, pc.k)
  for split, n, out, prompts in splits:
    ids = np.repeat(prompts.arrays["input_ids"][:n], pc.k, axis=0)
    mask = np.repeat(prompts.arrays["attention_mask"][:n], pc.k, axis=0)
    resp = generation.generate_responses(
        cfg, params, tokenizer, ids, mask, jax.random.PRNGKey(seed + 7 + len(split)),
        max_new_tokens=MAX_NEW_TOKENS, batch_size=64)
    rows = []
    for i, prompt in enumerate(prompts.texts[:n]):
      responses = resp.texts[i * pc.k:(i + 1) * pc.k]
      finished = [bool(x) for x in resp.has_eos[i * pc.k:(i + 1) * pc.k]]
      ranks = tie_identical(responses, finished, oracle.rank(prompt, responses, rng,
                                                              finished=finished))
      rows.append(dict(prompt=prompt, responses=responses, ranks=[int(r) for r in ranks],
                       finished=finished))
    if distributed.is_main_process():
      with open(out + ".tmp", "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
      os.replace(out + ".tmp", out)
  distributed.barrier("pipeline: rankings written")


def tie_identical(responses, finished, ranks) -> list:
  """Identical responses get one rank (the best they drew): a labeler can't prefer a copy.

  The oracle's Plackett–Luce noise orders equal scores at random; left as they are, pairs of
  identical texts would be label noise for the RM. Tied pairs are dropped by the loss.
  """
  best: dict = {}
  for text, fin, rank in zip(responses, finished, ranks):
    best[(text, fin)] = min(best.get((text, fin), rank), int(rank))
  return [best[(text, fin)] for text, fin in zip(responses, finished)]
