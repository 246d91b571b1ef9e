"""Load and save HF-format checkpoints (config.json + safetensors), per family.

`load_hf(path) -> (cfg, params)` reads a local directory written by `save_pretrained`
(single `model.safetensors` or a sharded `model.safetensors.index.json`). `save_hf(cfg,
params, out_dir)` writes a directory that `transformers.AutoModelForCausalLM` (causal params)
or `AutoModelForSequenceClassification` (scalar params, one label) loads with no missing or
unexpected keys, plus an `rlhf_jax.json` sidecar holding our exact ModelConfig. `save_hf`
streams: it fetches one tensor at a time (gathering it when split across processes) and
writes it straight into its file. `hf_sharded.load_hf_sharded` is the loader that reads
each device's slice straight into its shard; both use this module's name mapping
(`_entries`).

Scalar heads: HF's `score` layer has no bias. On export the head kernel becomes
`score.weight` and the head bias is NOT representable, so it is kept in `rlhf_jax.json`
(and restored by `load_hf`); transformers then reports scores minus that bias, and
`save_hf` warns when the bias is non-zero. On import from plain HF the bias is 0.

Where a scalar model is read: transformers' *ForSequenceClassification (4.x and 5.x, e.g.
`modeling_layers.GenericForSequenceClassification`, `GPT2ForSequenceClassification`) takes
the score at the rightmost token whose id is not `config.pad_token_id`; the attention mask
plays no part in that choice. Our reward model reads it at the EOS that ends each response
(`data.load_comparisons`' `last_index`). With pad = EOS, as many tokenizers set it,
transformers would read the token BEFORE that EOS. So `save_hf` writes, for scalar models,
a `pad_token_id` that is never EOS and never a real input token:

  * the model's own pad id when it differs from EOS (a pad token is never text);
  * else the first id past the tokenizer's vocabulary, when `save_hf(tokenizer=...)` shows
    the embedding has such unused rows (vocab sizes padded to a multiple of 64 or 128);
  * else one zero row appended to the exported embedding (config vocab_size + 1) whose id
    is the pad id: no tokenizer produces it. `rlhf_jax.json` records it, and `load_hf`
    drops the row again, so our round trip is exact.

Caveat for transformers users: pad batches with `model.config.pad_token_id` (right or left
padding; also pass the attention mask), NOT with the tokenizer's pad token when that is EOS:

    enc = tokenizer(texts, padding=True, return_tensors="pt")   # each text ends with EOS
    enc["input_ids"][enc["attention_mask"] == 0] = model.config.pad_token_id
    scores = model(**enc).logits[:, 0]

A single unpadded sequence needs nothing. Our `models.scores` reads whatever `index` it is
given.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from rlhf_jax.models import api
from rlhf_jax.models import hf_config
from rlhf_jax.models.config import ModelConfig

SIDECAR = "rlhf_jax.json"
INDEX_FILE = "model.safetensors.index.json"
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model.",
           "gpt_neox": "gpt_neox."}

# One entry: HF tensor name, our param paths, HF array -> our arrays, our arrays -> HF array.
Entry = tuple[str, list[tuple[str, ...]], Callable, Callable]


def _linear(path, shape_out):
  """nn.Linear weight [out, in] <-> kernel [in, *shape_out]."""
  return ([path], lambda w: [w.T.reshape((w.shape[1],) + tuple(shape_out))],
          lambda ks: ks[0].reshape(ks[0].shape[0], -1).T)


def _linear_in(path, shape_in):
  """nn.Linear weight [out, in] <-> kernel [*shape_in, out] (attention output projection)."""
  return ([path], lambda w: [w.T.reshape(tuple(shape_in) + (w.shape[0],))],
          lambda ks: ks[0].reshape(-1, ks[0].shape[-1]).T)


def _same(path, shape=None, hf_shape=(-1,)):
  """Same layout, optionally reshaped (e.g. bias [N*H] <-> [N, H])."""
  if shape is None:
    return ([path], lambda w: [w], lambda ks: ks[0])
  return ([path], lambda w: [w.reshape(shape)], lambda ks: ks[0].reshape(hf_shape))


def _embed_name(cfg: ModelConfig) -> str:
  """HF name of the token embedding."""
  name = {"gpt2": "wte.weight", "gpt_neox": "embed_in.weight"}.get(cfg.family,
                                                                   "embed_tokens.weight")
  return _PREFIX[cfg.family] + name


def _entries(cfg: ModelConfig, kind: str) -> list[Entry]:
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  fam = cfg.family
  pre = _PREFIX[fam]
  out: list[Entry] = []

  def add(name, spec):
    out.append((name, *spec))

  def norm(hf_name, ours, bias):
    add(f"{hf_name}.weight", _same(ours + ("scale",)))
    if bias:
      add(f"{hf_name}.bias", _same(ours + ("bias",)))

  bb = ("backbone",)
  ln = cfg.norm_type == "layernorm"
  add(_embed_name(cfg), _same(bb + ("embed", "embedding")))
  if fam == "gpt2":
    add(pre + "wpe.weight", _same(bb + ("pos_embed", "embedding")))
  for i in range(cfg.num_layers):
    L = bb + (f"layer_{i}",)
    at = L + ("attn",)
    mlp = L + ("mlp",)
    if fam == "gpt2":
      p = f"{pre}h.{i}."
      norm(p + "ln_1", L + ("attn_norm",), True)
      norm(p + "ln_2", L + ("mlp_norm",), True)
      # Conv1D weights are [in, out]: x @ W, so no transpose; q|k|v concatenated on out.
      qkv = [at + (x, "kernel") for x in ("q", "k", "v")]
      add(p + "attn.c_attn.weight",
          (qkv, lambda w: [a.reshape(d, n, h) for a in np.split(w, 3, axis=1)],
           lambda ks: np.concatenate([a.reshape(d, -1) for a in ks], axis=1)))
      qkv_b = [at + (x, "bias") for x in ("q", "k", "v")]
      add(p + "attn.c_attn.bias",
          (qkv_b, lambda b: [a.reshape(n, h) for a in np.split(b, 3)],
           lambda bs: np.concatenate([a.reshape(-1) for a in bs])))
      add(p + "attn.c_proj.weight", _same(at + ("o", "kernel"), (n, h, d), (n * h, d)))
      add(p + "attn.c_proj.bias", _same(at + ("o", "bias")))
      add(p + "mlp.c_fc.weight", _same(mlp + ("up", "kernel")))
      add(p + "mlp.c_fc.bias", _same(mlp + ("up", "bias")))
      add(p + "mlp.c_proj.weight", _same(mlp + ("down", "kernel")))
      add(p + "mlp.c_proj.bias", _same(mlp + ("down", "bias")))
    elif fam == "gpt_neox":
      p = f"{pre}layers.{i}."
      norm(p + "input_layernorm", L + ("attn_norm",), True)
      norm(p + "post_attention_layernorm", L + ("mlp_norm",), True)
      # Fused rows are laid out per head: [N, (q|k|v), H] x D.
      qkv = [at + (x, "kernel") for x in ("q", "k", "v")]
      add(p + "attention.query_key_value.weight",
          (qkv, lambda w: [w.reshape(n, 3, h, d)[:, j].transpose(2, 0, 1) for j in range(3)],
           lambda ks: np.stack([a.transpose(1, 2, 0) for a in ks], axis=1).reshape(3 * n * h, d)))
      if cfg.qkv_bias:
        qkv_b = [at + (x, "bias") for x in ("q", "k", "v")]
        add(p + "attention.query_key_value.bias",
            (qkv_b, lambda b: [b.reshape(n, 3, h)[:, j] for j in range(3)],
             lambda bs: np.stack(bs, axis=1).reshape(-1)))
      add(p + "attention.dense.weight", _linear_in(at + ("o", "kernel"), (n, h)))
      if cfg.out_bias:
        add(p + "attention.dense.bias", _same(at + ("o", "bias")))
      add(p + "mlp.dense_h_to_4h.weight", _linear(mlp + ("up", "kernel"), (cfg.intermediate_size,)))
      add(p + "mlp.dense_h_to_4h.bias", _same(mlp + ("up", "bias")))
      add(p + "mlp.dense_4h_to_h.weight", _linear(mlp + ("down", "kernel"), (d,)))
      add(p + "mlp.dense_4h_to_h.bias", _same(mlp + ("down", "bias")))
    else:
      p = f"{pre}layers.{i}."
      norm(p + "input_layernorm", L + ("attn_norm",), False)
      norm(p + "post_attention_layernorm", L + ("mlp_norm",), False)
      for x, heads in (("q", n), ("k", k), ("v", k)):
        add(f"{p}self_attn.{x}_proj.weight", _linear(at + (x, "kernel"), (heads, h)))
        if cfg.qkv_bias:
          add(f"{p}self_attn.{x}_proj.bias", _same(at + (x, "bias"), (heads, h)))
      add(p + "self_attn.o_proj.weight", _linear_in(at + ("o", "kernel"), (n, h)))
      if cfg.out_bias:
        add(p + "self_attn.o_proj.bias", _same(at + ("o", "bias")))
      for x, hf_x in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        width = (d,) if x == "down" else (cfg.intermediate_size,)
        add(f"{p}mlp.{hf_x}.weight", _linear(mlp + (x, "kernel"), width))
        if cfg.mlp_bias:
          add(f"{p}mlp.{hf_x}.bias", _same(mlp + (x, "bias")))
  final = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm"}.get(fam, "norm")
  norm(pre + final, bb + ("final_norm",), ln)
  if kind == "causal" and not cfg.tie_word_embeddings:
    add("lm_head.weight", _linear(("lm_head", "kernel"), (cfg.vocab_size,)))
  if kind == "scalar":
    add("score.weight", _linear(("head", "kernel"), (1,)))
  return out


class _Tensors:
  """Lazy name -> numpy float32 reader over one or several safetensors files."""

  def __init__(self, path: Path):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._open = safe_open
    index = path / INDEX_FILE
    single = path / "model.safetensors"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.files = {name: path / f for name, f in weight_map.items()}
      self.where = str(index)
    elif single.exists():
      with safe_open(str(single), framework="numpy") as f:
        self.files = {name: single for name in f.keys()}
      self.where = str(single)
    else:
      raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json "
                       "(only safetensors checkpoints are supported)")

  def names(self):
    return set(self.files)

  def shape(self, name: str) -> tuple:
    with self._open(str(self.files[name]), framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def read(self, name: str, index: tuple) -> np.ndarray:
    """The block `index` (a tuple of unit-step slices) of one tensor in its stored dtype.

    safetensors reads only that block's bytes (by offset); bfloat16 / float8 come back as
    ml_dtypes arrays, which numpy needs registered (importing ml_dtypes does it).
    """
    import ml_dtypes  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    with self._open(str(self.files[name]), framework="numpy") as f:
      return f.get_slice(name)[index]

  def get(self, name: str) -> np.ndarray:
    file = str(self.files[name])
    with self._open(file, framework="numpy") as f:
      if f.get_slice(name).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
        with self._open(file, framework="flax") as fj:
          return np.asarray(fj.get_tensor(name).astype("float32"))
      return f.get_tensor(name).astype(np.float32)


def _resolve(name: str, available: set, prefix: str) -> str | None:
  """The stored name for `name`: as is, without the base-model prefix, or a legacy alias."""
  candidates = [name]
  if name.startswith(prefix):
    candidates.append(name[len(prefix):])        # e.g. the original GPT-2 checkpoint
  if name == "lm_head.weight":
    candidates.append("embed_out.weight")         # GPT-NeoX / Pythia before transformers 5
  for c in candidates:
    if c in available:
      return c
  return None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def read_header(path):
  """(cfg, kind, score_bias, pad_row, tensors) of a local HF checkpoint directory.

  Everything but the weights: the config (ours from the sidecar when present), the kind
  from the architecture, the scalar head's bias and pad-row flag (module docstring) and a
  lazy reader over the safetensors files. Shared by `load_hf` and `hf_sharded`.
  """
  path = Path(path)
  config_file = path / "config.json"
  if not config_file.exists():
    raise ValueError(f"{path}: not an HF checkpoint directory (no config.json)")
  hf = json.loads(config_file.read_text())
  cfg, kind = hf_config.from_hf_config(hf, str(config_file))
  score_bias, pad_row = 0.0, False
  sidecar = path / SIDECAR
  if sidecar.exists():
    extra = json.loads(sidecar.read_text())
    cfg = ModelConfig.from_dict(extra["config"])
    score_bias = float(extra.get("score_bias", 0.0))
    pad_row = bool(extra.get("score_pad_row", False))
  return cfg, kind, score_bias, pad_row, _Tensors(path)


def stored_name(tensors: "_Tensors", cfg: ModelConfig, kind: str, name: str) -> str:
  """The name `name` has in the files (`_resolve`), or a ValueError naming it and the file."""
  stored = _resolve(name, tensors.names(), _PREFIX[cfg.family])
  if stored is None:
    raise ValueError(f"{tensors.where}: missing tensor {name!r} needed for "
                     f"{hf_config.ARCHITECTURES[(cfg.family, kind)]}")
  return stored


def load_hf(path) -> tuple[ModelConfig, dict]:
  """Reads a local HF checkpoint directory onto this host (see `hf_sharded` for a loader
  that reads each device's slice straight into its shard).

  Args:
    path: directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json).

  Returns:
    (cfg, params): params are float32 numpy-backed jax arrays; kind from the architecture
    (*ForCausalLM / GPT2LMHeadModel -> causal, *ForSequenceClassification -> scalar).

  Raises:
    ValueError: missing files, unknown architecture, or a missing tensor (named, with file).
    NotImplementedError: a config feature we do not implement (named).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cfg, kind, score_bias, pad_row, tensors = read_header(path)
  abstract = api.abstract_params(cfg, kind)
  params: dict = {}
  for name, paths, to_ours, _ in _entries(cfg, kind):
    stored = stored_name(tensors, cfg, kind, name)
    arrays = to_ours(tensors.get(stored))
    if pad_row and name == _embed_name(cfg):
      arrays = [arrays[0][:cfg.vocab_size]]  # the pad row save_hf appended (module docstring)
    for p, a in zip(paths, arrays):
      want = _get(abstract, p).shape
      if tuple(a.shape) != tuple(want):
        raise ValueError(f"{tensors.where}: tensor {stored!r} gives {'.'.join(p)} shape "
                         f"{tuple(a.shape)}, expected {tuple(want)} from config.json")
      _set(params, p, jnp.asarray(a, jnp.float32))
  # Biases the checkpoint does not have (e.g. HF's bias-free score layer) start at zero.
  if kind == "scalar":
    _set(params, ("head", "bias"), jnp.full((1,), score_bias, jnp.float32))
  return cfg, params


def _transformers_major() -> int:
  import transformers  # pylint: disable=import-outside-toplevel
  return int(transformers.__version__.split(".")[0])


def _score_pad_id(cfg: ModelConfig, tokenizer, score_pad_id) -> tuple[int, bool]:
  """(pad_token_id for a scalar export, whether it needs an appended embedding row).

  See the module docstring: the id must differ from EOS and never occur in real inputs.
  """
  eos = cfg.eos_token_id
  if score_pad_id is not None:
    if isinstance(score_pad_id, bool) or not isinstance(score_pad_id, (int, np.integer)) \
        or not 0 <= score_pad_id < cfg.vocab_size or score_pad_id == eos:
      raise ValueError(f"save_hf: score_pad_id={score_pad_id!r}: expected an id in "
                       f"[0, {cfg.vocab_size}) other than eos_token_id={eos}")
    return int(score_pad_id), False
  if cfg.pad_token_id is not None and cfg.pad_token_id != eos:
    return int(cfg.pad_token_id), False
  if tokenizer is not None and len(tokenizer) < cfg.vocab_size:
    return len(tokenizer), False
  return cfg.vocab_size, True


# The largest output file save_hf writes (a tensor larger than this gets a file of its own),
# below the 5 GB some tools and file systems limit files to.
MAX_FILE_BYTES = 2 * 1024**3


def _identity(x):
  return x


def _fetch(x, keep: bool = True):
  """One param as a host float32 array (None where `keep` is False).

  An array split across processes is gathered (a collective: every process calls this in
  the same order) into ONE copy per process, spread over that process's devices (sharded
  along a dim the array is already split on, replicated over processes), and assembled
  on the host. A plain `process_allgather` would replicate it on every local device: 4
  copies of the largest tensor on a host of 4 CPU devices.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x, np.float32) if keep else None
  if x.is_fully_replicated:  # every process has it whole: no need to talk
    return np.asarray(x.addressable_data(0), np.float32) if keep else None
  y = jax.jit(_identity, out_shardings=_one_copy_per_process(x))(x)
  if not keep:
    # Wait anyway: one gather in flight at a time. Processes that raced ahead with several
    # queued gathers deadlocked in gloo (seen exporting a 1B model over 2 processes).
    jax.block_until_ready(y)
    return None
  out = np.empty(x.shape, np.float32)
  for shard in y.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
  return out


def _one_copy_per_process(x):
  """A sharding of `x`'s devices as a (process, local) mesh: split over `local` along a dim
  `x` is already split on where it divides (so XLA gathers across processes only)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  devices = sorted(x.sharding.device_set, key=lambda d: (d.process_index, d.id))
  by_process: dict = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  mesh = Mesh(np.array(list(by_process.values())), ("process", "local"))
  local = mesh.shape["local"]
  split = x.sharding.shard_shape(x.shape)
  dims = [k for k in range(x.ndim) if split[k] < x.shape[k]] + list(range(x.ndim))
  target = [None] * x.ndim
  for k in dims:
    if x.shape[k] % local == 0:
      target[k] = "local"
      break
  return NamedSharding(mesh, PartitionSpec(*target))


class _SafetensorsWriter:
  """Writes one .safetensors file tensor by tensor, never holding more than one.

  The layout (spec: https://github.com/huggingface/safetensors#format): an 8-byte
  little-endian header length, a JSON header (name -> dtype, shape, data_offsets; padded
  with spaces to a multiple of 8), then the tensors' bytes back to back. All shapes are
  known before the first tensor arrives, so the header is written first.
  """

  def __init__(self, path: Path, shapes: list[tuple[str, tuple]]):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
      size = 4 * int(np.prod(shape))
      header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
      offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    self._f = open(path, "wb")  # pylint: disable=consider-using-with
    self._f.write(len(text).to_bytes(8, "little") + text)
    self._todo = list(shapes)

  def write(self, name: str, tensor: np.ndarray) -> None:
    want_name, want_shape = self._todo.pop(0)
    if (name, tuple(tensor.shape)) != (want_name, tuple(want_shape)):
      raise RuntimeError(f"safetensors writer: got {name} {tensor.shape}, expected "
                         f"{want_name} {want_shape}")
    self._f.write(memoryview(np.ascontiguousarray(tensor, "<f4")).cast("B"))
    if not self._todo:
      self._f.close()


def process_barrier(name: str, timeout_s: int = 600) -> None:
  """Every process waits here for the others (no-op for one process).

  Why: on CPU, gloo sets up a device group's context at its first collective and fails when
  a peer is more than 30 s late; per-process loading or writing can leave the processes that
  far apart. This barrier goes through the coordination service, which waits `timeout_s`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=import-outside-toplevel
  multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def _plan_files(sizes: list[int], max_bytes: int) -> list[int]:
  """The output file of each tensor, in order: a new file once the next would pass max_bytes."""
  files, current, used = [], 0, 0
  for size in sizes:
    if used and used + size > max_bytes:
      current, used = current + 1, 0
    files.append(current)
    used += size
  return files


def save_hf(cfg: ModelConfig, params: dict, out_dir, tokenizer=None,
            score_pad_id=None, max_file_bytes: int = MAX_FILE_BYTES) -> None:
  """Writes an HF checkpoint directory (config.json, safetensors, rlhf_jax.json).

  Causal params load with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`;
  scalar params with `AutoModelForSequenceClassification` (num_labels=1), which then reads
  its score at the same token as our reward model when batches are padded with
  `config.pad_token_id` (module docstring). The directory is written under a temporary name
  and renamed into place, so it is never half-written.

  Streaming: tensors are fetched one at a time (a gather across processes when a param is
  split over several, so with global arrays EVERY process must call this, in step) and
  only process 0 writes, each tensor straight to its file. Besides its share of the model
  a process holds about two copies of the tensor in flight (gathered, then in HF layout).
  Several files are written as transformers does: model-0000i-of-0000n.safetensors plus
  model.safetensors.index.json; a model that fits one file gets a plain model.safetensors.

  Args:
    cfg: the architecture.
    params: causal or scalar params (kind inferred from the keys): host arrays or global
      jax.Arrays.
    out_dir: target directory (replaced if it exists).
    tokenizer: optional, scalar models only: its length shows which embedding rows no token
      uses, so one can serve as the pad id instead of appending a row.
    score_pad_id: optional, scalar models only: the pad_token_id to write (an id in the
      vocabulary, not EOS, that never occurs in inputs); overrides the choice above.
    max_file_bytes: the size above which the weights are split into several files.
  """
  import jax  # pylint: disable=import-outside-toplevel
  kind = api.kind_of(params)
  out_dir = Path(out_dir)
  writer = jax.process_index() == 0
  export_cfg, pad_row = cfg, False
  if kind == "scalar":
    pad, pad_row = _score_pad_id(cfg, tokenizer, score_pad_id)
    export_cfg = cfg.replace(pad_token_id=pad, vocab_size=cfg.vocab_size + int(pad_row))
  hf_cfg = hf_config.to_hf_config(export_cfg, kind)
  entries = _entries(cfg, kind)
  embed = _embed_name(cfg)
  # Output shapes from ours through to_hf on zero-stride stand-ins (no memory), so every
  # file's name (…-of-n) and header are known before the first tensor is fetched.
  names, shapes, sizes = [], [], []
  for name, paths, _, to_hf in entries:
    stand_ins = [np.broadcast_to(np.zeros((), np.int8), np.shape(_get(params, p))) for p in paths]
    shape = tuple(to_hf(stand_ins).shape)
    if pad_row and name == embed:
      shape = (shape[0] + 1,) + shape[1:]
    if name == "lm_head.weight" and cfg.family == "gpt_neox" and _transformers_major() < 5:
      name = "embed_out.weight"  # the 4.x name
    names.append(name)
    shapes.append(shape)
    sizes.append(4 * int(np.prod(shape)))
  files = _plan_files(sizes, max_file_bytes)
  count = files[-1] + 1
  file_names = (["model.safetensors"] if count == 1 else
                [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
  score_bias = 0.0
  if kind == "scalar":
    score_bias = float(_fetch(params["head"]["bias"]).reshape(-1)[0])
    if score_bias != 0.0 and writer:
      warnings.warn(f"save_hf: the scalar head bias {score_bias:g} has no place in HF's "
                    f"bias-free `score` layer; it is kept in {SIDECAR} only, so transformers "
                    "will report scores minus this bias")
  tmp = out_dir.with_name(out_dir.name + ".tmp")
  if writer:
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
  process_barrier("rlhf_jax.save_hf")  # the gathers below start together (process_barrier)
  out = None
  for i, ((name, paths, _, to_hf), out_name) in enumerate(zip(entries, names)):
    arrays = [_fetch(_get(params, p), keep=writer) for p in paths]  # may be a collective
    if not writer:
      continue
    if out is None:  # the first tensor of file files[i]
      out = _SafetensorsWriter(tmp / file_names[files[i]],
                               [(n, sh) for n, sh, f in zip(names, shapes, files) if f == files[i]])
    tensor = to_hf(arrays)
    del arrays
    if pad_row and name == embed:  # a zero embedding row for the pad id (module docstring)
      tensor = np.concatenate([tensor, np.zeros((1, tensor.shape[1]), tensor.dtype)])
    out.write(out_name, tensor)
    del tensor
    if i + 1 == len(entries) or files[i + 1] != files[i]:
      out = None
  if not writer:
    return
  if count > 1:
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {n: file_names[f] for n, f in zip(names, files)}}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
  hf_cfg.save_pretrained(str(tmp))
  sidecar = {"config": cfg.to_dict(), "kind": kind, "score_bias": score_bias}
  if kind == "scalar":
    sidecar.update(score_pad_id=export_cfg.pad_token_id, score_pad_row=pad_row)
  (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
  if out_dir.exists():
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
