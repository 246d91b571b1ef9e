"""Batched sampling of text responses for labeling and evaluation (host side)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from rlhf_jax import models, objectives, sampling


@dataclasses.dataclass
class Responses:
  texts: list            # decoded responses (special tokens skipped)
  tokens: np.ndarray     # [n, N] sampled token ids (pad after EOS)
  mask: np.ndarray       # [n, N]
  has_eos: np.ndarray    # [n] bool


def generate_responses(cfg, params, tokenizer, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                       rng, max_new_tokens: int, batch_size: int = 64,
                       temperature: float = 1.0, greedy: bool = False,
                       top_k: int = 0, top_p: float = 1.0) -> Responses:
  """Samples one response per prompt row, in fixed-size batches (one compile)."""
  n = len(prompt_ids)
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  pad = eos if pad is None else pad
  tokens, mask = [], []
  for i, start in enumerate(range(0, n, batch_size)):
    ids = prompt_ids[start:start + batch_size]
    m = prompt_mask[start:start + batch_size]
    short = batch_size - len(ids)
    if short:  # pad the last batch with copies so the shape (and the compile) is the same
      ids = np.concatenate([ids, np.repeat(ids[-1:], short, 0)])
      m = np.concatenate([m, np.repeat(m[-1:], short, 0)])
    out = sampling.generate(cfg, params, ids, m, jax.random.fold_in(rng, i),
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_id=eos, greedy=greedy, pad_id=pad)
    tokens.append(np.asarray(out.tokens)[:batch_size - short])
    mask.append(np.asarray(out.mask)[:batch_size - short])
  tokens, mask = np.concatenate(tokens), np.concatenate(mask)
  has_eos = np.any((tokens == eos) & (mask > 0), axis=1)
  texts = [tokenizer.decode([t for t, k in zip(row, mrow) if k], skip_special_tokens=True)
           for row, mrow in zip(tokens, mask)]
  return Responses(texts=texts, tokens=tokens, mask=mask, has_eos=has_eos)


def load_policy(model_dir: str):
  cfg, params = models.load_hf(model_dir)
  return cfg, jax.device_put(params)


def sequence_logprob_sums(cfg, params, prompt_ids, prompt_mask, tokens, mask,
                          batch_size: int = 64, temperature: float = 1.0) -> np.ndarray:
  """Σ_t log π(y_t | x, y_<t) of given responses under a policy: [n]."""
  p_len = prompt_ids.shape[1]
  fn = jax.jit(lambda p, ids, m: objectives.response_logprobs(cfg, p, ids, m, p_len,
                                                              temperature))
  sums = []
  for start in range(0, len(tokens), batch_size):
    ids = np.concatenate([prompt_ids[start:start + batch_size],
                          tokens[start:start + batch_size]], 1)
    m = np.concatenate([prompt_mask[start:start + batch_size],
                        mask[start:start + batch_size]], 1)
    short = batch_size - len(ids)
    if short:
      ids = np.concatenate([ids, np.repeat(ids[-1:], short, 0)])
      m = np.concatenate([m, np.repeat(m[-1:], short, 0)])
    lp = np.asarray(fn(params, ids, m)) * m[:, p_len:]
    sums.append(lp.sum(1)[:batch_size - short])
  return np.concatenate(sums)


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
