"""KV-cache sampling: one jitted prefill over the prompt, then a `lax.while_loop` decode.

    out = sampling.generate(cfg, params, input_ids, attention_mask, rng, max_new_tokens=N,
                            temperature=1.0, top_k=0, top_p=1.0, eos_id=None, greedy=False)
    out.tokens, out.logprobs, out.mask            # [B, N] each
    # chat models: stop on EOS or the template's end-of-turn token (e.g. <|im_end|>)
    out = sampling.generate(..., eos_id=data.stop_ids(tokenizer))

Shapes are static: the KV cache has length S = P + N for a prompt batch `[B, P]`, so one
compilation serves every batch of a (B, P, N) bucket. The compiled function is cached by
`jax.jit` on the static arguments `(cfg, max_new_tokens, top_k, greedy, use_top_p)` (and on
the number of EOS ids, padded to a multiple of 4); `temperature`, `top_p`, the EOS ids and
`pad_id` are traced, so changing them (e.g. a temperature sweep) does not recompile. `top_p`
given as a Python float >= 1.0 skips the nucleus sort altogether (a static decision); a
traced `top_p` always pays for the sort.

Prompts are LEFT padded. Row b's prompt positions are `cumsum(mask) - 1`; the j-th generated
token of row b gets position `sum(mask[b]) + j`. The cache is written at slots `[0, P)` by
the prefill and slot `P + j` for generated token j (the prefill covers the first P - 1
prompt tokens only and the last one goes through the first decode step, so the prefill's
unused `[B, P, V]` logits are never computed); the kv mask is the prompt mask followed
by ones (causality already hides slots that are not written yet, and rows that have stopped
produce outputs that are discarded).

Log-probs are float32 log-softmax of `logits / temperature` after top-k / top-p filtering,
read at the chosen token: the log-probability of the token under the distribution it was
actually drawn from. With `greedy=True` they are log-softmax of `logits / temperature`
unfiltered (filtering would make every greedy log-prob 0 under top_k=1).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.models import transformer


class GenerateOutput(NamedTuple):
  """What `generate` returns; a pytree, each leaf `[B, max_new_tokens]`.

  Attributes:
    tokens: int32 generated tokens; `pad_id` after a row's EOS (any of the stop ids).
    logprobs: float32 log-prob of each token under the sampling distribution; 0 where mask 0.
    mask: int32, 1 for generated tokens up to and including the EOS, 0 afterwards.
  """
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into a batch.

  Args:
    prompts: B lists of token ids, each non-empty.
    pad_id: id written into the padding slots.
    length: padded length P (a bucket size); defaults to the longest prompt.

  Returns:
    `(input_ids, attention_mask)`, int32 numpy arrays `[B, P]`, real tokens right-aligned.

  Raises:
    ValueError: a prompt is empty or longer than `length`.
  """
  lengths = [len(p) for p in prompts]
  if not prompts:
    raise ValueError("pad_prompts: got no prompts")
  if min(lengths) == 0:
    raise ValueError(f"pad_prompts: prompt {lengths.index(0)} is empty; every row needs a token")
  if length is None:
    length = max(lengths)
  if max(lengths) > length:
    i = int(np.argmax(lengths))
    raise ValueError(f"pad_prompts: prompt {i} has {lengths[i]} tokens, more than length={length}")
  ids = np.full((len(prompts), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(prompts), length), dtype=np.int32)
  for b, p in enumerate(prompts):
    ids[b, length - len(p):] = np.asarray(p, dtype=np.int32)
    mask[b, length - len(p):] = 1
  return ids, mask


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: Union[float, jax.Array] = 1.0
                  ) -> jax.Array:
  """Top-k then top-p (nucleus) filtering; removed entries become -inf.

  Top-k keeps every logit >= the k-th largest (ties at the boundary are all kept, as in
  transformers). Top-p keeps the smallest prefix of the descending-sorted distribution
  whose cumulative probability reaches `top_p` (the top token always survives), then keeps
  every logit >= the smallest kept one (ties at the cut are all kept). Top-p is computed on
  the distribution left by top-k. Pass temperature-scaled logits.

  Args:
    logits: `[..., V]` float logits.
    top_k: static int; 0 (or >= V) disables.
    top_p: float in (0, 1]; 1.0 disables. May be a traced scalar.

  Returns:
    float32 logits of the same shape.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if top_k and top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if isinstance(top_p, numbers.Real) and top_p >= 1.0:
    return logits
  sorted_desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  # Probability mass strictly before each sorted entry; the entry is needed while that
  # mass is still short of top_p. Entry 0 (mass 0) is always kept.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_before < top_p).at[..., 0].set(True)
  cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  filtered = jnp.where(logits < cutoff, -jnp.inf, logits)
  if isinstance(top_p, numbers.Real):
    return filtered
  return jnp.where(top_p >= 1.0, logits, filtered)  # traced top_p: 1.0 is exactly a no-op


def _select(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int,
            top_p: jax.Array, greedy: bool, use_top_p: bool,
            rows: Optional[jax.Array] = None, batch: int = 0) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row from `[b, V]` logits; returns (tokens int32, logprobs f32).

  With `rows` (a compacted decode batch: row i is row `rows[i]` of a `batch`-row one) the
  Gumbel noise is drawn for the whole `[batch, V]` batch and gathered, so each row gets the
  noise `jax.random.categorical(key, ...)` gives it in the uncompacted loop (which is
  `argmax(gumbel(key, [batch, V]) + logits)`): compaction changes no draw.
  """
  scaled = logits.astype(jnp.float32) / temperature
  if greedy:
    dist = scaled
    tokens = jnp.argmax(scaled, axis=-1)
  else:
    dist = filter_logits(scaled, top_k, top_p if use_top_p else 1.0)
    if rows is None:
      tokens = jax.random.categorical(key, dist, axis=-1)
    else:
      noise = jax.random.gumbel(key, (batch, dist.shape[-1]), dist.dtype)
      tokens = jnp.argmax(jnp.take(noise, rows, axis=0) + dist, axis=-1)
  logp = jax.nn.log_softmax(dist, axis=-1)
  logp = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  return tokens.astype(jnp.int32), logp


class _LoopState(NamedTuple):
  step: jax.Array        # index of the next token to choose
  feed: jax.Array        # [B] token to feed at slot prompt_len - 1 + step
  cache: dict
  done: jax.Array        # [B] bool, row has emitted EOS (before `step`)
  rng: jax.Array
  tokens: jax.Array      # [B, N]
  logprobs: jax.Array    # [B, N]
  mask: jax.Array        # [B, N]


class _CompactState(NamedTuple):
  """The decode loop's state when the batch may be compacted: b <= B live-first rows."""
  loop: _LoopState       # feed / cache / done are [b]-wide; tokens / logprobs / mask [B, N]
  rows: jax.Array        # [b] each row's index in the caller's batch
  kv_mask: jax.Array     # [b, S]
  last_pos: jax.Array    # [b]
  row_steps: jax.Array   # rows decoded so far, summed over steps (the compute spent)


def decode_widths(batch: int, compact: int) -> tuple[int, ...]:
  """The decode batch widths a compacting loop steps through: B, B/2, ... (`compact` halvings
  at most, rounding up, never below 1)."""
  widths = [batch]
  while len(widths) <= compact and widths[-1] > 1:
    widths.append(-(-widths[-1] // 2))
  return tuple(widths)


def _narrow(s: _CompactState, width: int) -> _CompactState:
  """Keeps `width` rows, live ones first (a stable sort on `done`), with their KV cache."""
  keep = jnp.argsort(s.loop.done.astype(jnp.int32), stable=True)[:width]
  take = lambda a: jnp.take(a, keep, axis=0)
  loop = s.loop._replace(feed=take(s.loop.feed), cache=jax.tree.map(take, s.loop.cache),
                         done=take(s.loop.done))
  return _CompactState(loop, take(s.rows), take(s.kv_mask), take(s.last_pos), s.row_steps)


def compute_dtype_weights(cfg, params):
  """`params` with every matrix (ndim >= 2: kernels, embeddings) cast to `cfg.dtype`.

  Decoding is memory bound: each step reads every weight once. The layers cast each matrix
  to `cfg.dtype` where they use it, and XLA does not hoist that cast out of the decode
  `while_loop`, so with float32 master weights and bfloat16 compute every step read the
  float32 copy and wrote and re-read a bfloat16 one (about 4x the bytes of a bfloat16 read;
  docs/benchmarks.md has the measurement). Casting once before the loop
  gives the same numbers, since matrices are only ever used after that same cast. Vectors
  (norm scales, biases) stay as they are: LayerNorm uses its float32 scale un-cast.
  """
  dtype = jnp.dtype(cfg.dtype)

  def cast(x):
    if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, params)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "greedy",
                                             "use_top_p", "compact"))
def _generate(cfg, params, input_ids, attention_mask, rng, temperature, top_p, eos_ids, pad_id,
              *, max_new_tokens, top_k, greedy, use_top_p, compact=0):
  batch, prompt_len = input_ids.shape
  n = max_new_tokens
  input_ids = input_ids.astype(jnp.int32)
  attention_mask = attention_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
  kv_mask = jnp.concatenate([attention_mask, jnp.ones((batch, n), jnp.int32)], axis=-1)
  last_pos = positions[:, -1]               # position of the last prompt token (left padded)

  # Prefill all but the last prompt token. Its logits are unused, so XLA drops the
  # [B, P, V] unembedding (about a third of the prefill FLOPs at GPT-2 small); the last
  # prompt token goes through the first decode step, whose logits predict token 0.
  params = compute_dtype_weights(cfg, params)
  cache = models.init_cache(cfg, batch, prompt_len + n)
  if prompt_len > 1:
    _, cache = models.forward_with_cache(cfg, params, input_ids[:, :-1], positions[:, :-1],
                                         kv_mask, cache, 0)

  def cond(s: _LoopState):
    return (s.step < n) & ~jnp.all(s.done)

  def decode_step(s: _LoopState, kv_mask, last_pos, rows, write) -> _LoopState:
    """One token for each of the loop's rows (`rows`: their indices in the full batch, None
    when they are all of it); `write(out, column)` stores a [b] column at step `s.step`."""
    logits, cache = models.forward_with_cache(cfg, params, s.feed[:, None],
                                              (last_pos + s.step)[:, None], kv_mask, s.cache,
                                              prompt_len - 1 + s.step)
    rng, key = jax.random.split(s.rng)
    tok, logp = _select(logits[:, -1], key, temperature, top_k, top_p, greedy, use_top_p,
                        rows=rows, batch=batch)
    live = ~s.done
    tok = jnp.where(live, tok, pad_id)
    done = s.done | (live & jnp.any(tok[:, None] == eos_ids[None, :], axis=-1))
    return _LoopState(s.step + 1, tok, cache, done, rng, write(s.tokens, tok),
                      write(s.logprobs, jnp.where(live, logp, 0.0)),
                      write(s.mask, live.astype(jnp.int32)))

  def body(s: _LoopState):
    col = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v[:, None], s.step, axis=1)
    return decode_step(s, kv_mask, last_pos, None, col)

  state = _LoopState(
      step=jnp.zeros((), jnp.int32), feed=input_ids[:, -1], cache=cache,
      done=jnp.zeros((batch,), bool), rng=rng, tokens=jnp.full((batch, n), pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, n), jnp.float32), mask=jnp.zeros((batch, n), jnp.int32))
  widths = decode_widths(batch, compact)
  if len(widths) == 1:
    state = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(state.tokens, state.logprobs, state.mask), state.step * batch

  # Compacting: one loop per width; a loop ends when no more than the next width's rows are
  # live, and those rows (with their cache) move on to the narrower loop. Outputs stay
  # [B, N], written at each row's index in the caller's batch, and are held split over the
  # batch axes like the plain loop's: left to itself, XLA replicates what a scatter at
  # data-dependent rows writes, and a multi-process caller reading its own rows
  # (`addressable_shards`) would then see all of them.
  mesh = transformer.trace_mesh(input_ids, attention_mask)
  split = lambda a: transformer.constrain_batch(a, mesh)  # noqa: E731

  def narrow_body(c: _CompactState):
    put = lambda a, v: split(a.at[c.rows, c.loop.step].set(v))
    loop = decode_step(c.loop, c.kv_mask, c.last_pos, c.rows, put)
    return _CompactState(loop, c.rows, c.kv_mask, c.last_pos,
                         c.row_steps + c.rows.shape[0])

  state = state._replace(tokens=split(state.tokens), logprobs=split(state.logprobs),
                         mask=split(state.mask))
  c = _CompactState(state, jnp.arange(batch, dtype=jnp.int32), kv_mask, last_pos,
                    jnp.zeros((), jnp.int32))
  for i, _ in enumerate(widths):
    nxt = widths[i + 1] if i + 1 < len(widths) else 0
    c = jax.lax.while_loop(
        lambda c, nxt=nxt: (c.loop.step < n) & (jnp.sum(~c.loop.done) > nxt), narrow_body, c)
    if nxt:
      c = _narrow(c, nxt)
  return GenerateOutput(*map(split, (c.loop.tokens, c.loop.logprobs, c.loop.mask))), c.row_steps


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def generate(cfg: models.ModelConfig, params, input_ids, attention_mask, rng: jax.Array,
             max_new_tokens: int, temperature: Union[float, jax.Array] = 1.0, top_k: int = 0,
             top_p: Union[float, jax.Array] = 1.0,
             eos_id: Union[None, int, Sequence[int]] = None, greedy: bool = False,
             pad_id: int = 0, compact: int = 0) -> GenerateOutput:
  """Samples `max_new_tokens` tokens after each left-padded prompt.

  `generate_with_row_steps` takes the same arguments and also returns the decode compute.

  Works under an outer `jax.jit` (then `temperature` / `top_p` may be traced) and with
  sharded params (nothing is moved to one device).

  Args:
    cfg: the model config (static, hashable).
    params: causal-model params (`models.init(..., kind="causal")` / `models.load_hf`).
    input_ids: `[B, P]` int prompt tokens, LEFT padded.
    attention_mask: `[B, P]`, 1 on real tokens; every row needs at least one.
    rng: a PRNG key (unused when `greedy`).
    max_new_tokens: N, static.
    temperature: > 0; logits are divided by it before filtering (and for `logprobs`).
    top_k: static int, 0 = off.
    top_p: nucleus mass in (0, 1], 1.0 = off.
    eos_id: an id, or a sequence of stop ids any of which ends a row (e.g.
      `data.stop_ids(tokenizer)`: EOS plus a chat template's end-of-turn token); None =
      never stop. The stop token itself is kept (mask 1).
    greedy: argmax instead of sampling (top_k / top_p ignored).
    pad_id: written after a row's EOS.
    compact: static, at most this many halvings of the decode batch (0 = off). Once no more
      than half of the rows are still live, the live rows move, with their KV cache, into a
      batch half as wide, so finished rows stop costing compute (about half of a rollout's
      row-steps when lengths spread over [1, N]; docs/benchmarks.md). Draws are unchanged:
      each row gets the same sampling noise as without compaction, so tokens differ only
      where a narrower matmul rounds a logit differently. Each width compiles one more
      decode loop. Without stop ids it does nothing.

  Returns:
    `GenerateOutput(tokens, logprobs, mask)`, each `[B, max_new_tokens]`; the EOS itself has
    mask 1, later slots hold `pad_id`, logprob 0, mask 0. The loop stops early once every
    row has emitted EOS.

  Raises:
    ValueError: bad shapes or arguments, or (for concrete inputs) a prompt batch that is
    not left padded / has an empty row, or a too-long sequence for learned positions.
  """
  return generate_with_row_steps(
      cfg, params, input_ids, attention_mask, rng, max_new_tokens, temperature=temperature,
      top_k=top_k, top_p=top_p, eos_id=eos_id, greedy=greedy, pad_id=pad_id,
      compact=compact)[0]


def generate_with_row_steps(cfg: models.ModelConfig, params, input_ids, attention_mask,
                            rng: jax.Array, max_new_tokens: int,
                            temperature: Union[float, jax.Array] = 1.0, top_k: int = 0,
                            top_p: Union[float, jax.Array] = 1.0,
                            eos_id: Union[None, int, Sequence[int]] = None,
                            greedy: bool = False, pad_id: int = 0, compact: int = 0
                            ) -> tuple[GenerateOutput, jax.Array]:
  """`generate`, plus the rows the decode loop computed summed over its steps (int32 scalar):
  B x decode steps without compaction, less with it. Benchmarks and tests read it."""
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f"generate: input_ids {input_ids.shape} and attention_mask "
                     f"{attention_mask.shape} must both be [batch, prompt_len]")
  max_new_tokens = int(max_new_tokens)
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens}, expected >= 1")
  if isinstance(temperature, numbers.Real) and temperature <= 0:
    raise ValueError(f"generate: temperature={temperature}, expected > 0 (use greedy=True)")
  if isinstance(top_p, numbers.Real) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p={top_p}, expected in (0, 1]")
  top_k = int(top_k)
  compact = int(compact)
  if compact < 0:
    raise ValueError(f"generate: compact={compact}, expected >= 0 halvings (0 = off)")
  if top_k < 0:
    raise ValueError(f"generate: top_k={top_k}, expected >= 0")
  prompt_len = input_ids.shape[1]
  if cfg.position_type == "learned" and prompt_len + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(
        f"generate: prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds the "
        f"model's max_position_embeddings={cfg.max_position_embeddings}")
  # The left-padding check reads the mask on the host: skipped for a global array that
  # spans processes (multi-host), where no single host can read all its rows.
  if _is_concrete(attention_mask) and getattr(attention_mask, "is_fully_addressable", True):
    m = np.asarray(attention_mask)
    if not np.all(m[:, -1]):
      raise ValueError("generate: prompts must be LEFT padded (attention_mask[:, -1] must be 1 "
                       "for every row); see sampling.pad_prompts")
  # EOS ids are traced and padded with -1 (never sampled) to a multiple of 4, so the common
  # cases (none, one, a few) share one compilation.
  if isinstance(eos_id, (set, frozenset)) or (
      not isinstance(eos_id, (type(None), numbers.Integral, jax.Array, np.ndarray))
      and hasattr(eos_id, "__iter__")):
    eos_id = [int(t) for t in eos_id]  # lists, tuples, sets, generators of ids
  eos_ids = jnp.zeros((0,), jnp.int32) if eos_id is None else jnp.asarray(eos_id, jnp.int32)
  if eos_ids.ndim > 1:
    raise ValueError(f"generate: eos_id must be an id or a 1-D sequence of ids, got {eos_id!r}")
  eos_ids = jnp.atleast_1d(eos_ids)
  width = max(4, -(-eos_ids.shape[0] // 4) * 4)
  eos_ids = jnp.pad(eos_ids, (0, width - eos_ids.shape[0]), constant_values=-1)
  if greedy:   # filtering does not apply; don't let it split the compilation cache
    top_k, top_p = 0, 1.0
  use_top_p = not (isinstance(top_p, numbers.Real) and top_p >= 1.0)
  return _generate(cfg, params, input_ids, attention_mask, rng,
                   jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
                   eos_ids, jnp.asarray(pad_id, jnp.int32), max_new_tokens=max_new_tokens,
                   top_k=top_k, greedy=bool(greedy), use_top_p=use_top_p,
                   compact=compact if eos_id is not None else 0)
