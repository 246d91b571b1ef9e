"""Glue between config data specs, `rlhf_jax.data` loaders and the host loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.errors import ConfigError


def spec_from_config(spec_cfg):
  from rlhf_jax import data
  return data.DataSpec(
      path=spec_cfg.path, split=spec_cfg.split, format=spec_cfg.format or None,
      columns={role: name for role, name in spec_cfg.columns.items() if name},
      on_bad_row=spec_cfg.on_bad_row,
      max_rows=spec_cfg.max_rows or None)


def total_steps(train_cfg, n_examples: int) -> int:
  if train_cfg.steps:
    return int(train_cfg.steps)
  if n_examples < train_cfg.batch_size:
    raise ConfigError("train.batch_size", train_cfg.batch_size,
                      f"at most the number of usable examples ({n_examples})")
  return max(1, train_cfg.epochs * n_examples // train_cfg.batch_size)


def check_batch_split(mesh, global_batch_size: int, field: str = "train.batch_size") -> None:
  """A global batch must split evenly over the processes and the ('data', 'fsdp') shards.

  Raises:
    ConfigError: naming `field`, the mesh and the process count, instead of a shape error
      from deep inside `sharding.host_to_global`.
  """
  from rlhf_jax import sharding
  shards, procs = sharding.batch_shards(mesh), jax.process_count()
  if global_batch_size % shards or global_batch_size % procs:
    raise ConfigError(field, global_batch_size,
                      f"a multiple of the mesh's data x fsdp = {shards} batch shards "
                      f"(mesh {dict(mesh.shape)}) and of the {procs} processes")


def length_bucketing(config, keys, side: str = "right"):
  """The `data.bucket_min_len` length bucketing of `keys` (None when it is 0)."""
  from rlhf_jax import data
  smallest = int(config.data.bucket_min_len)
  return data.Bucketing(tuple(keys), smallest, side) if smallest > 0 else None


def iterator(arrays: dict, global_batch_size: int, seed: int, bucketing=None):
  """This host's slice of each global batch, in a seed-determined order, resumable."""
  from rlhf_jax import data
  return data.BatchIterator(arrays, global_batch_size, seed,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), drop_last=True,
                            bucketing=bucketing)


def eval_batches(arrays: dict, global_batch_size: int, max_batches: int, bucketing=None):
  """The first `max_batches` full global batches in file order (host slices)."""
  n = len(next(iter(arrays.values())))
  per_host = global_batch_size // jax.process_count()
  lo = jax.process_index() * per_host
  for b in range(min(max_batches, n // global_batch_size)):
    start = b * global_batch_size + lo
    batch = {k: v[start:start + per_host] for k, v in arrays.items()}
    if bucketing is not None:
      whole = arrays[bucketing.mask_key][b * global_batch_size:(b + 1) * global_batch_size]
      batch = bucketing.cut(batch, bucketing.length(whole))
    yield batch


def response_buckets(config, max_new_tokens: int) -> tuple:
  """Length buckets of a rollout's responses (just `(max_new_tokens,)` when bucketing is off)."""
  from rlhf_jax import data
  return data.length_buckets(max_new_tokens, int(config.data.bucket_min_len))


@jax.jit
def _longest(mask):
  return jnp.max(jnp.sum(mask, axis=-1))


@functools.partial(jax.jit, static_argnums=1)
def _first_columns(out, length: int):
  return jax.tree.map(lambda x: x[:, :length], out)


def cut_responses(out, buckets: tuple):
  """A `sampling.GenerateOutput` cut to the bucket of its longest response.

  Columns past every row's last token are padding (mask 0), so the experience and the update
  see the same valid tokens. Reads one scalar from the device (the rollout is complete by
  then anyway); every host computes the same length from the global mask.
  """
  if len(buckets) == 1:
    return out
  from rlhf_jax import data
  length = data.bucket_for(max(int(_longest(out.mask)), 1), buckets)
  return out if length == out.tokens.shape[1] else _first_columns(out, length)
