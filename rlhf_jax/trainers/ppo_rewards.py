"""PPO's host side of a rollout: a Python reward function's scores, and the logged samples.

The experience is one jitted function of device arrays; a `ppo.reward_fn` runs on the host
between the rollout and the experience (`function_scores`) and its scores go in as one
more [B] array, split over the batch axes like the prompts. Each process scores only its
own rows (`local_rows`): its prompts' text (the dataset's, carried by row id through the
batch iterator; decoded from the tokens when a caller has no text) and its responses
decoded up to the stop token. In a multi-process run every process learns whether any
process's function failed before the scores are assembled, so a bad return value stops
every process with the same one-line error instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from rlhf_jax import reward_fns, sharding
from rlhf_jax.errors import UserError


@dataclasses.dataclass
class Scored:
  """A reward function's scores of one rollout.

  Attributes:
    scores: the global [B] float32 array the experience reads.
    host_scores: this process's rows' scores (float64).
    prompts, responses: this process's rows' text, as the function saw them.
  """
  scores: jax.Array
  host_scores: np.ndarray
  prompts: list
  responses: list


def local_rows(x) -> np.ndarray:
  """This process's rows of a global array split along dim 0 (what it passed to
  `sharding.host_to_global`); the whole array on one process. Not a collective."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  blocks = {}
  for shard in x.addressable_shards:   # replicas of a block hold the same rows: keep one
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def stop_ids(models) -> list:
  """The ids a response ends at (its text stops before them)."""
  if models.stop_ids:
    return list(models.stop_ids)
  return [] if models.eos_id is None else [models.eos_id]


def prompt_texts(tokenizer, input_ids: np.ndarray, attention_mask: np.ndarray) -> list:
  """Prompts decoded from their tokens (for callers without the dataset's text)."""
  rows = [ids[m > 0].tolist() for ids, m in zip(input_ids, attention_mask)]
  return tokenizer.batch_decode(rows, skip_special_tokens=True)


def rollout_texts(models, batch, out, prompts: Optional[Sequence[str]], n: Optional[int] = None):
  """(prompts, responses) of this process's first `n` rows (all when None) as text."""
  if models.tokenizer is None:
    raise ValueError("ppo.Models.tokenizer is needed to decode responses (reward_fn, samples)")
  tokens, mask = local_rows(out.tokens), local_rows(out.mask)
  if n is not None:
    tokens, mask = tokens[:n], mask[:n]
  if prompts is None:
    ids, pmask = local_rows(batch["input_ids"]), local_rows(batch["attention_mask"])
    prompts = prompt_texts(models.tokenizer, ids[:len(tokens)], pmask[:len(tokens)])
  responses = reward_fns.response_texts(models.tokenizer, tokens, mask, stop_ids(models))
  return list(prompts)[:len(tokens)], responses


def function_scores(mesh, models, batch, out, prompts: Optional[Sequence[str]]) -> Scored:
  """`models.reward_fn` on this process's rows of a rollout, as a global [B] array.

  Args:
    mesh: the mesh the batch is split over.
    models: `ppo.Models` with `reward_fn` and `tokenizer`.
    batch: the global prompt batch (its tokens are decoded when `prompts` is None).
    out: the rollout (`sampling.GenerateOutput`, global arrays).
    prompts: this process's prompt texts in row order, or None.

  Raises:
    UserError: the function's one-line error (on every process when any one failed).
  """
  prompts, responses = rollout_texts(models, batch, out, prompts)
  error, scores = None, np.zeros((len(responses),), np.float64)
  try:
    scores = models.reward_fn(prompts, responses)
  except UserError as e:
    error = e
  _agree_on_failure(models.reward_fn, error)
  return Scored(sharding.host_to_global(mesh, scores.astype(np.float32)), scores, prompts,
                responses)


def _agree_on_failure(reward_fn, error: Optional[UserError]) -> None:
  """Raises `error`; with several processes, every one raises when any one failed."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.any():
      raise UserError(f"{reward_fns.FIELD}={reward_fn.spec} failed on process "
                      f"{int(np.argmax(failed))} (its log says why)")
  if error is not None:
    raise error


def sample_rows(models, batch, out, exp, n: int, prompts: Optional[Sequence[str]] = None,
                scored: Optional[Scored] = None) -> list:
  """This process's first `n` rows of a rollout as dicts for `samples_log.SamplesWriter`:
  prompt, response, score (the total the experience used), fn_score (with a reward
  function) and kl (Σ_t log π/π_SFT of the response)."""
  if scored is not None:
    texts = (scored.prompts[:n], scored.responses[:n])
  else:
    texts = rollout_texts(models, batch, out, prompts, n)
  scores, kls = local_rows(exp.scores), local_rows(exp.kls)
  rows = []
  for i, (prompt, response) in enumerate(zip(*texts)):
    row = dict(prompt=prompt, response=response, score=float(scores[i]))
    if scored is not None:
      row["fn_score"] = float(scored.host_scores[i])
    row["kl"] = float(kls[i])
    rows.append(row)
  return rows
