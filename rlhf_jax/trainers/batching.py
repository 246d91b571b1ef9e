"""Glue between config data specs, `rlhf_jax.data` loaders and the host loop.

The trainers load their datasets with `load`: through the on-disk token cache
(`data.load_cached`), so that each of the job's processes tokenizes its share of the rows
and holds only the rows of its batches. The cache lives in ``$RLHF_JAX_DATA_CACHE`` when
set, else in the run's ``<workdir>/data_cache`` (`use_workdir_cache`, which `run.run` calls;
the workdir is shared by every process of a job), else (a trainer called directly) in
``$XDG_CACHE_HOME/rlhf_jax/data``, i.e. ``~/.cache/rlhf_jax/data``. On a cluster it must be
a directory every process sees; ``RLHF_JAX_DATA_CACHE=off`` loads every
dataset whole in every process instead (the dense arrays, no files written).
"""

from __future__ import annotations

import functools
import os

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


CACHE_ENV = "RLHF_JAX_DATA_CACHE"


# Set by `use_workdir_cache` for the run in progress (launch/train.py -> run.run).
_workdir_cache = None


def use_workdir_cache(workdir: str) -> None:
  """Makes `<workdir>/data_cache` the default token cache of this run.

  Every process of a job already shares its workdir (the checkpoints live there), whereas
  `~/.cache` is usually local to a node: a pod or cluster job would otherwise stop at the
  cache's "every process must see it" check.
  """
  global _workdir_cache
  _workdir_cache = os.path.join(workdir, "data_cache")


def data_cache_dir():
  """The token cache directory (module docstring), or None when it is turned off."""
  value = os.environ.get(CACHE_ENV)
  if value is None and _workdir_cache is not None:
    return _workdir_cache
  if value is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.expanduser(os.path.join(base, "rlhf_jax", "data"))
  if value.strip().lower() in ("", "off", "0", "none"):
    return None
  return os.path.expanduser(value)


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def load(kind: str, spec, tokenizer, **params):
  """Dataset `kind` ("sft", "comparisons", "prompts", "text") with the loader's params,
  through the token cache shared by this job's processes (module docstring)."""
  from rlhf_jax import data
  cache_dir = data_cache_dir()
  if cache_dir is None:
    return data.load_kind(kind, spec, tokenizer, params)
  count = jax.process_count()
  return data.load_cached(kind, spec, tokenizer, params, cache_dir,
                          process_index=jax.process_index(), process_count=count,
                          barrier=_barrier if count > 1 else None)


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
