"""Batched sampling, log-prob sums, reward scores and LM loss over host (numpy) arrays.

The built-in pipeline's labeling and evaluation and the `launch/sample.py` /
`launch/evaluate.py` commands all go through these, so a response is sampled, decoded and
scored the same way everywhere.

    out = generation.generate_responses(cfg, params, tokenizer, ids, mask, rng,
                                        max_new_tokens=64, num_samples=4,
                                        stop_ids=data.stop_ids(tokenizer), mesh=mesh)
    out.texts, out.tokens, out.mask, out.has_eos   # prompt-major: prompt i's samples at
                                                   # rows i*K .. i*K+K-1
    lp = generation.sequence_logprob_sums(cfg, params, ids, mask, out.tokens, out.mask)
    r = generation.reward_scores(rm_cfg, rm_params, seq_ids, seq_mask, last, normalization)

Rows are processed in fixed-size batches, the last one padded with copies of its last row
(whose outputs are dropped), so one compilation serves the whole set.

With `mesh=None` each batch is a plain numpy array and the params are wherever the caller
put them (the pipeline: one device). With a mesh, the params must already be placed on it
and each batch's rows are split over its ('data', 'fsdp') axes like a training batch: every
process passes its own contiguous slice (`sharding.host_to_global`) and reads the whole
result back (`workdir.host_copy`, a collective), so every process must make the same calls
with the same host arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from rlhf_jax import models, objectives, sampling, sharding
from rlhf_jax import workdir as workdir_lib


@dataclasses.dataclass
class Responses:
  """Sampled responses, one row per (prompt, sample), prompt-major.

  Attributes:
    texts: decoded responses without their stop token (special tokens skipped).
    tokens: [n, N] sampled token ids (pad after the stop token).
    mask: [n, N], 1 on generated tokens up to and including the stop token.
    has_eos: [n] bool, the row ended at a stop id (EOS unless `stop_ids` were given);
      False means it was cut off at `max_new_tokens`.
  """
  texts: list
  tokens: np.ndarray
  mask: np.ndarray
  has_eos: np.ndarray


def _call_rows(batch_size: int, mesh) -> int:
  """Rows of one call: `batch_size`, rounded up so that a mesh's batch shards and the
  processes each get the same number of rows."""
  if mesh is None:
    return batch_size
  step = math.lcm(sharding.batch_shards(mesh), jax.process_count())
  return -(-batch_size // step) * step


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  short = rows - len(x)
  return np.concatenate([x, np.repeat(x[-1:], short, 0)]) if short else x


def _place(batch: dict, mesh) -> dict:
  """A padded host batch as the function's inputs: numpy, or this process's slice on the
  mesh."""
  if mesh is None:
    return batch
  rows = len(next(iter(batch.values())))
  per = rows // jax.process_count()
  lo = jax.process_index() * per
  return sharding.host_to_global(mesh, {k: v[lo:lo + per] for k, v in batch.items()})


def map_batches(fn: Callable, arrays: dict, batch_size: int, mesh=None) -> list:
  """`fn(i, batch)` over consecutive `batch_size`-row batches of `arrays`, outputs on host.

  Args:
    fn: called with the batch index and a dict like `arrays` (numpy, or global arrays on
      `mesh`); returns a pytree of arrays with the batch rows first.
    arrays: name -> host array [n, ...], all with the same n >= 1.
    batch_size: rows per call (padded with copies of the last row; on a mesh also up to a
      multiple of its batch shards).
    mesh: see the module docstring.

  Returns:
    One output pytree per batch, numpy, cut to the batch's real rows.
  """
  n = len(next(iter(arrays.values())))
  rows = _call_rows(batch_size, mesh)
  outs = []
  for i, start in enumerate(range(0, n, batch_size)):
    real = min(batch_size, n - start)
    batch = {k: _pad_rows(v[start:start + batch_size], rows) for k, v in arrays.items()}
    out = workdir_lib.host_copy(fn(i, _place(batch, mesh)))
    outs.append(jax.tree.map(lambda x: x[:real], out))
  return outs


def decode(tokenizer, tokens: np.ndarray, mask: np.ndarray, stops: Sequence[int]) -> list:
  """Each row's text: its masked tokens without a final stop token, special tokens skipped.

  The stop token is left out even when it is an ordinary token (e.g. an EOS id from
  `generation_config.json`): whoever reads the text adds the end of the turn itself (the
  reward model's comparison rows, `data.load_comparisons`, append it when `finished`).
  """
  stops = set(int(s) for s in stops)
  texts = []
  for row, mrow in zip(tokens, mask):
    ids = [int(t) for t, k in zip(row, mrow) if k]
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids, skip_special_tokens=True))
  return texts


def generate_responses(cfg, params, tokenizer, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                       rng, max_new_tokens: int, batch_size: int = 64,
                       temperature: float = 1.0, greedy: bool = False,
                       top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
                       stop_ids: Optional[Sequence[int]] = None, mesh=None,
                       compact: int = 2) -> Responses:
  """Samples `num_samples` responses per prompt row, `batch_size` prompts per call.

  A prompt's samples come from one `sampling.generate` call on the batch with each prompt
  repeated `num_samples` times; call i uses the key `fold_in(rng, i)`.

  Args:
    cfg, params: the policy (on `mesh` when one is given).
    tokenizer: decodes the responses; its pad id (else EOS) fills finished rows.
    prompt_ids, prompt_mask: [n, P] LEFT padded prompts (`data.load_prompts`).
    rng: a PRNG key.
    max_new_tokens, temperature, greedy, top_k, top_p: as in `sampling.generate`.
    batch_size: prompts per call.
    num_samples: K responses per prompt.
    stop_ids: ids that end a response (`data.stop_ids`); None: the tokenizer's EOS only.
    mesh: see the module docstring.
    compact: `sampling.generate`'s decode-batch halvings once rows stop (the same samples,
      less compute on finished rows); 0 = off.

  Returns:
    `Responses` with n * num_samples rows, prompt i's samples at rows i*K .. i*K+K-1.
  """
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  pad = eos if pad is None else pad
  stops = [eos] if stop_ids is None else [int(s) for s in stop_ids]
  eos_arg = eos if stop_ids is None else stops
  k = int(num_samples)
  arrays = dict(ids=np.repeat(prompt_ids, k, 0), mask=np.repeat(prompt_mask, k, 0))

  def fn(i, batch):
    out = sampling.generate(cfg, params, batch["ids"], batch["mask"], jax.random.fold_in(rng, i),
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_id=eos_arg, greedy=greedy,
                            pad_id=pad, compact=compact)
    return out.tokens, out.mask
  outs = map_batches(fn, arrays, batch_size * k, mesh)
  tokens = np.concatenate([t for t, _ in outs])
  mask = np.concatenate([m for _, m in outs])
  has_eos = np.any(np.isin(tokens, np.asarray(stops)) & (mask > 0), axis=1)
  return Responses(texts=decode(tokenizer, tokens, mask, stops), tokens=tokens, mask=mask,
                   has_eos=has_eos)


def load_policy(model_dir: str):
  cfg, params = models.load_hf(model_dir)
  return cfg, jax.device_put(params)


def sequence_logprob_sums(cfg, params, prompt_ids, prompt_mask, tokens, mask,
                          batch_size: int = 64, temperature: float = 1.0,
                          mesh=None) -> np.ndarray:
  """Σ_t log π(y_t | x, y_<t) of given responses under a policy: [n].

  The log-probs are of softmax(logits / temperature) (`objectives.response_logprobs`): the
  distribution `sampling.generate` draws from when top-k / top-p are off.
  """
  p_len = prompt_ids.shape[1]
  fn = jax.jit(lambda p, ids, m: objectives.response_logprobs(cfg, p, ids, m, p_len,
                                                              temperature))
  arrays = dict(ids=np.concatenate([prompt_ids, tokens], 1),
                mask=np.concatenate([prompt_mask, mask], 1))
  outs = map_batches(lambda i, b: fn(params, b["ids"], b["mask"]), arrays, batch_size, mesh)
  return np.concatenate([(lp * m[:, p_len:]).sum(1) for lp, m in
                         zip(outs, _chunks(arrays["mask"], batch_size))])


def _chunks(x: np.ndarray, batch_size: int) -> list:
  return [x[start:start + batch_size] for start in range(0, len(x), batch_size)]


def reward_scores(cfg, params, input_ids, attention_mask, last_index, normalization: dict,
                  batch_size: int = 64, mesh=None) -> np.ndarray:
  """A reward model's normalised scores of right-padded sequences, read at `last_index`: [n].

  `normalization` is the RM's `reward_normalization.json` (`workdir.read_rm_normalization`);
  see `objectives.normalized_scores`.
  """
  fn = jax.jit(lambda p, ids, m, last: objectives.normalized_scores(cfg, p, ids, m, last,
                                                                    normalization)[0])
  arrays = dict(ids=input_ids, mask=attention_mask, last=np.asarray(last_index, np.int32))
  outs = map_batches(lambda i, b: fn(params, b["ids"], b["mask"], b["last"]), arrays,
                     batch_size, mesh)
  return np.concatenate(outs)


def lm_loss(cfg, params, arrays: dict, batch_size: int = 64,
            max_batches: Optional[int] = None) -> float:
  """Token-level mean next-token NLL over `arrays` (input_ids / attention_mask / loss_mask)."""
  fn = jax.jit(lambda p, b: objectives.lm_loss_and_count(cfg, p, b))
  total = count = 0.0
  n = len(arrays["input_ids"])
  for b, start in enumerate(range(0, n - batch_size + 1, batch_size)):
    if max_batches is not None and b >= max_batches:
      break
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    loss, c = fn(params, batch)
    total, count = total + float(loss) * float(c), count + float(c)
  return total / max(count, 1.0)
