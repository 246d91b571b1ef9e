"""PPO's run around the iteration: its data, start-up checks, alarms and logs.

`ppo.train` calls these: the prompts (each row carrying its index into the dataset's
prompt texts, for the reward function and the samples) and the pretraining text, the
checks that the RM reads the policy's tokens in the policy's format, the loud KL / score
bounds, and the samples log with the optional W&B run (`RunLogs`).
"""

from __future__ import annotations

import logging
from typing import Optional

import jax
import numpy as np

from rlhf_jax import data, samples_log, sharding
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.trainers import batching

log = logging.getLogger("rlhf_jax")


def load_data(config, tokenizer):
  """Prompts (train, and eval when given) and, for PPO-ptx, packed pretraining text."""
  p = config.ppo
  prompts = batching.load("prompts", batching.spec_from_config(config.data.train), tokenizer,
                          max_prompt_len=config.data.max_prompt_len)
  log.info("[ppo] prompts: %s", prompts.report)
  eval_prompts = None
  if config.data.eval.path:
    eval_prompts = batching.load("prompts", batching.spec_from_config(config.data.eval),
                                 tokenizer, max_prompt_len=config.data.max_prompt_len)
  ptx = None
  if p.ptx_coef > 0:
    if not config.data.ptx.path:
      raise ConfigError("data.ptx.path", "", "a plain-text dataset when ppo.ptx_coef > 0 "
                        "(or set --config.ppo.ptx_coef=0 for plain PPO)")
    ptx = batching.load("text", batching.spec_from_config(config.data.ptx), tokenizer,
                        seq_len=config.data.max_len, pack=True)
    log.info("[ppo] pretraining data: %s", ptx.report)
    _check_ptx_size(config, ptx)
  return prompts, eval_prompts, ptx


def _check_ptx_size(config, ptx) -> None:
  """Enough packed pretraining text for one update's ptx batches, or a line that says so."""
  p = config.ppo
  need, have = p.minibatches * p.ptx_batch_size, len(ptx.arrays["input_ids"])
  if have < need:
    raise UserError(
        f"data.ptx.path={config.data.ptx.path}: {ptx.report.n_used} rows packed into {have} "
        f"sequences of data.max_len={config.data.max_len} tokens, fewer than the {need} one "
        f"PPO update needs (ppo.minibatches={p.minibatches} x ppo.ptx_batch_size="
        f"{p.ptx_batch_size}); add pretraining text, or lower ppo.ptx_batch_size")


class RunLogs:
  """The samples log and the optional W&B run of one PPO run (process 0 writes).

  The samples writer opens at the first step, whose index is the step resumed from, so the
  rows a killed run wrote after its last checkpoint are dropped first.
  """

  def __init__(self, config, workdir: str, stage: str = "ppo"):
    self.stage = stage     # the `stage` of the rows (GRPO's run logs as "grpo")
    self.every, self.n = int(config.train.sample_every), int(config.train.samples_logged)
    self.workdir = workdir
    self.main = jax.process_index() == 0
    self.wandb = None
    if config.train.wandb and self.main:
      self.wandb = metrics_lib.WandbSink(config.train.wandb, workdir, stage,
                                         config=config.to_dict())
    self.samples: Optional[samples_log.SamplesWriter] = None

  def samples_due(self, index: int) -> int:
    """Rows to log at the end of iteration `index` (0 when none are due)."""
    due = self.every > 0 and (index + 1) % self.every == 0
    return self.n if due and self.main else 0

  def write_samples(self, index: int, rows) -> None:
    if self.samples is None and self.main:
      self.samples = samples_log.SamplesWriter(self.workdir, self.stage, resume_step=index,
                                               wandb=self.wandb)
    if rows and self.samples is not None:
      self.samples.write(index + 1, rows)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.samples is not None:
      self.samples.close()
    if self.wandb is not None:
      self.wandb.close()


def with_rows(prompts) -> dict:
  """The prompt arrays plus each row's index into `prompts.texts`."""
  return dict(prompts.arrays, row=np.arange(len(prompts), dtype=np.int64))


def split_rows(mesh, host_batch: dict, texts) -> tuple:
  """(global batch without the row ids, this process's prompt texts in row order)."""
  host_batch = dict(host_batch)
  rows = host_batch.pop("row")
  return sharding.host_to_global(mesh, host_batch), [texts[int(i)] for i in rows]


def check_tokenizers(config, tokenizer) -> None:
  """The RM (and value model) must read the policy's token ids: same tokenizer, or fail now."""
  p = config.ppo
  checks = []
  if p.reward_from:
    checks.append(("reward model",
                   workdir_lib.resolve_model_dir(p.reward_from, "scalar", "ppo.reward_from")))
  if p.value_from and p.value_from != p.reward_from:
    checks.append(("value model",
                   workdir_lib.resolve_model_dir(p.value_from, "scalar", "ppo.value_from")))
  for name, model_dir in checks:
    if not workdir_lib.has_tokenizer(model_dir):
      log.warning("[ppo] no tokenizer saved next to the %s (%s): cannot check that it "
                  "matches the policy's", name, model_dir)
      continue
    other = workdir_lib.read_tokenizer(model_dir)
    data.check_same_tokenizer(tokenizer, other, names=("policy", name))


def check_format(config, prompts, normalization: dict) -> None:
  """The RM must score what PPO samples: chat prompts for a chat-trained RM, plain for plain."""
  trained_on = normalization.get("format")
  if trained_on and trained_on != prompts.format:
    raise UserError(f"data.train.path={config.data.train.path} holds {prompts.format} prompts "
                    f"but the reward model ppo.reward_from={config.ppo.reward_from} was trained "
                    f"on {trained_on} rows: it would score text in a format it never saw — use "
                    "one format for every stage")


def warn_bounds(index: int, kl: float, score: float, p) -> dict:
  """Loud log lines (and 0/1 metrics) when KL or the RM score leave `ppo.*_warn` bounds."""
  flags = {}
  for name, value, bound, why in (
      ("kl", kl, p.kl_warn, "the policy is drifting far from the SFT model"),
      ("score", score, p.score_warn, "the policy may be exploiting the reward model")):
    if not bound:
      continue
    exceeded = not np.isfinite(value) or abs(value) > bound
    flags[f"{name}_warn"] = int(exceeded)
    if exceeded:
      log.warning("[ppo] WARNING iteration %d: %s=%.4g is beyond ppo.%s_warn=%g: %s "
                  "(lower optim.lr / raise ppo.kl_coef)", index + 1, name, value, name,
                  bound, why)
  return flags


def restore_iters(d: dict, prompt_it, ptx_it) -> None:
  if d.get("prompts"):
    prompt_it.restore(d["prompts"])
  if ptx_it is not None and d.get("ptx"):
    ptx_it.restore(d["ptx"])
