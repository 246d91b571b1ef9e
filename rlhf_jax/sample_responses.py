"""`launch/sample.py`: K sampled responses per prompt of a file, as reward-model rows.

    mesh = sample_responses.make_mesh("data=-1")
    policy = sample_responses.load_model("runs/sft", "causal", mesh, "--model")
    prompts = sample_responses.load_prompts("prompts.jsonl", policy.tokenizer, 256)
    rows = sample_responses.sample_rows(policy, prompts, sample_responses.Settings(), mesh)
    sample_responses.write_jsonl("samples.jsonl", rows)        # process 0, atomic

A row is ``{"prompt": text, "responses": [K texts], "finished": [K bools]}``; for chat
prompts ``{"messages": [...], ...}``, the conversation as given without a trailing
assistant turn. That is the layout `data.load_comparisons` (the RM stage) reads once a
labeler adds ``"ranks"``, so sampling feeds labeling and the RM stage unchanged:

  * a plain prompt is written as the policy saw it: `data.load_prompts` drops trailing
    whitespace (the reply is sampled right after the prompt), so prompt + response
    tokenize at the boundary the sampler had;
  * a response is the decoded sample without its stop token; ``finished`` says whether it
    ended at a stop id (`data.stop_ids` of the model: EOS, a chat template's end of turn,
    `generation_config.json`'s EOS ids) rather than at ``max_new_tokens``. The RM stage
    appends the end of the turn to finished responses only, as PPO's rollouts end.

`launch/evaluate.py` (`rlhf_jax.compare`) loads its models and prompts with the same
functions. Every mistake the user can fix is a `UserError` that names the flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import data, generation, models, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.trainers import model_init

log = logging.getLogger("rlhf_jax")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How responses are sampled (the command-line flags of the same names)."""
  num_samples: int = 4       # K responses per prompt
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  batch_size: int = 16       # prompts per `sampling.generate` call (x num_samples rows)

  def check(self) -> None:
    """Raises a `UserError` naming the first flag with a value that cannot work."""
    ints = dict(num_samples=1, max_new_tokens=1, batch_size=1, top_k=0)
    for name, low in ints.items():
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"--{name}={value!r}: expected an integer >= {low}")
    if not self.temperature > 0:
      raise UserError(f"--temperature={self.temperature!r}: expected > 0")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"--top_p={self.top_p!r}: expected in (0, 1]")


@dataclasses.dataclass
class LoadedModel:
  """A model placed on the mesh, with the tokenizer saved beside it."""
  cfg: Any                 # models.ModelConfig
  params: Any              # global arrays on the mesh
  tokenizer: Any
  model_dir: str           # the HF directory it was read from
  stop_ids: list           # `data.stop_ids(tokenizer, model_dir)`


@dataclasses.dataclass
class Prompts:
  """Prompts of a file, tokenized for one tokenizer.

  Attributes:
    ids, mask: [n, P] int32, LEFT padded; P is the longest prompt (one compilation).
    texts: each prompt as tokenized (chats: the template rendered with the generation
      prompt).
    fields: what an output row holds for each prompt: {"prompt": text} or
      {"messages": [...]}.
    path: the file.
    is_chat: rows were chat messages.
  """
  ids: np.ndarray
  mask: np.ndarray
  texts: list
  fields: list
  path: str
  is_chat: bool

  def __len__(self) -> int:
    return len(self.texts)


def parse_mesh(text: str) -> dict:
  """`--mesh` ("data=-1", "data=2,fsdp=4") -> {axis: size}."""
  shape = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    name, sep, size = (s.strip() for s in item.partition("="))
    try:
      shape[name] = int(size)
    except ValueError:
      sep = ""
    if not sep or not name:
      raise UserError(f"--mesh={text}: expected axis=size pairs, e.g. data=-1 or "
                      f"data=2,fsdp=4 (axes {sharding.MESH_AXES})")
  return shape or dict(data=-1)


def make_mesh(text: str):
  """The device mesh of `--mesh`; batches are split over its ('data', 'fsdp') axes."""
  try:
    return sharding.make_mesh(parse_mesh(text))
  except ValueError as e:
    raise UserError(f"--mesh={text}: {e}") from None


def resolve_model_dir(path: str, kind: str, flag: str) -> str:
  """The HF directory of a user path (HF dir, or a workdir's export), naming `flag`."""
  try:
    return workdir_lib.resolve_model_dir(path, kind)
  except ConfigError:
    export = workdir_lib.EXPORT_NAMES[kind]
    raise UserError(f"{flag}={path}: not a model: expected a local HF model directory (with "
                    f"config.json) or a run's workdir containing export/{export}/config.json"
                    ) from None


def load_model(path: str, kind: str, mesh, flag: str, dtype: str = "auto") -> LoadedModel:
  """A policy ("causal") or reward model ("scalar") and its tokenizer, placed on `mesh`.

  Args:
    path: an HF directory or a workdir (`workdir.resolve_model_dir`).
    kind: "causal" or "scalar".
    mesh: the device mesh; params are sharded by `sharding.DEFAULT_RULES`.
    flag: the command-line flag `path` came from (for messages).
    dtype: compute dtype: "auto" (bfloat16 on an accelerator, float32 on CPU), "float32"
      or "bfloat16".
  """
  model_dir = resolve_model_dir(path, kind, flag)
  if not workdir_lib.has_tokenizer(model_dir):
    raise UserError(f"{flag}={path}: {model_dir} has no tokenizer (tokenizer.json / "
                    "tokenizer_config.json); save the model's tokenizer beside it")
  if dtype not in ("auto", "float32", "bfloat16"):
    raise UserError(f"--dtype={dtype}: expected auto, float32 or bfloat16")
  try:
    cfg, params = models.load_hf(model_dir)
  except (ValueError, NotImplementedError, OSError) as e:
    raise UserError(f"{flag}={path}: cannot load {model_dir}: {e}") from None
  loaded = "scalar" if "head" in params else "causal"
  if loaded != kind:
    want = {"causal": "a causal LM (policy)", "scalar": "a reward model"}
    raise UserError(f"{flag}={path}: {model_dir} holds {want[loaded]}; expected {want[kind]}")
  tokenizer = workdir_lib.read_tokenizer(model_dir)
  cfg = cfg.replace(dtype=config_lib.compute_dtype(dtype))
  model_init.check_vocab(tokenizer, cfg, f"model in {model_dir}")
  placed = model_init.place(mesh, sharding.DEFAULT_RULES, cfg, kind, jax.device_get(params),
                            model_dir)
  return LoadedModel(cfg, placed.params, tokenizer, model_dir,
                     data.stop_ids(tokenizer, model_dir))


def load_prompts(path: str, tokenizer, max_prompt_len: int, prompt_column: str = "",
                 on_bad_row: str = "error") -> Prompts:
  """The prompts of a jsonl / json / parquet / csv file (`data.load_prompts`).

  Rows hold a ``prompt`` text (or the column `prompt_column`) or chat ``messages``
  (rendered with the tokenizer's chat template and its generation prompt).

  Raises:
    UserError: a missing or unreadable file, or (with ``on_bad_row="error"``) the first
      unusable row, e.g. a prompt longer than `max_prompt_len`.
  """
  if on_bad_row not in ("error", "skip"):
    raise UserError(f"--on_bad_row={on_bad_row}: expected error or skip")
  if isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int) or \
      max_prompt_len < 1:
    raise UserError(f"--max_prompt_len={max_prompt_len!r}: expected an integer >= 1")
  spec = data.DataSpec(path=path, columns={"prompt": prompt_column} if prompt_column else {},
                       on_bad_row=on_bad_row)
  try:
    loaded = data.load_prompts(spec, tokenizer, max_prompt_len)
  except data.DataError as e:
    hint = " (raise --max_prompt_len)" if "[prompt_too_long]" in str(e) else ""
    raise UserError(f"--prompts: {e}{hint}") from None
  if loaded.report.n_skipped:
    log.warning("prompts: %s", loaded.report)
  if loaded.is_chat:
    column = spec.column("messages")
    source = data.open_source(spec).rows
    fields = []
    for i in loaded.row_ids:
      messages = list(source[int(i)][column])
      if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]   # load_prompts samples a new reply in its place
      fields.append({"messages": messages})
  else:
    fields = [{"prompt": text} for text in loaded.texts]
  ids, mask = loaded.arrays["input_ids"], loaded.arrays["attention_mask"]
  longest = int(mask.sum(1).max())
  return Prompts(ids=ids[:, -longest:], mask=mask[:, -longest:], texts=list(loaded.texts),
                 fields=fields, path=path, is_chat=loaded.is_chat)


def check_length(model: LoadedModel, prompts: Prompts, max_new_tokens: int, flag: str) -> None:
  """A model with learned positions must hold the longest prompt plus the response."""
  cfg, p_len = model.cfg, prompts.ids.shape[1]
  if cfg.position_type == "learned" and p_len + max_new_tokens > cfg.max_position_embeddings:
    raise UserError(f"--max_new_tokens={max_new_tokens}: the longest prompt has {p_len} "
                    f"tokens and {flag}'s model holds {cfg.max_position_embeddings} positions; "
                    f"use at most {cfg.max_position_embeddings - p_len} new tokens or shorter "
                    "prompts")


def sample(model: LoadedModel, prompts: Prompts, settings: Settings, mesh,
           flag: str = "--model") -> generation.Responses:
  """`settings.num_samples` responses per prompt, stopping at the model's stop ids."""
  settings.check()
  check_length(model, prompts, settings.max_new_tokens, flag)
  return generation.generate_responses(
      model.cfg, model.params, model.tokenizer, prompts.ids, prompts.mask,
      jax.random.PRNGKey(settings.seed), max_new_tokens=settings.max_new_tokens,
      batch_size=settings.batch_size, temperature=settings.temperature, top_k=settings.top_k,
      top_p=settings.top_p, num_samples=settings.num_samples, stop_ids=model.stop_ids,
      mesh=mesh)


def comparison_rows(prompts: Prompts, responses: generation.Responses, k: int) -> list:
  """One row per prompt: its prompt field, K responses and K `finished` flags."""
  rows = []
  for i, field in enumerate(prompts.fields):
    rows.append(dict(field, responses=responses.texts[i * k:(i + 1) * k],
                     finished=[bool(f) for f in responses.has_eos[i * k:(i + 1) * k]]))
  return rows


def sample_rows(model: LoadedModel, prompts: Prompts, settings: Settings, mesh) -> list:
  """The RM-ready rows (module docstring) of K samples per prompt."""
  return comparison_rows(prompts, sample(model, prompts, settings, mesh),
                         settings.num_samples)


def write_jsonl(path: str, rows: list) -> Optional[str]:
  """Process 0 writes `rows` as JSON lines, atomically (a temporary file, then a rename)."""
  if jax.process_index() != 0:
    return None
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"cannot write {path}: {e}") from None
  return path


def run(model: str, prompts: str, out: str, settings: Settings, mesh: str = "data=-1",
        prompt_column: str = "", max_prompt_len: int = 256, on_bad_row: str = "error",
        dtype: str = "auto") -> dict:
  """`launch/sample.py`: sample the prompts of `prompts` with `model` and write `out`.

  Returns:
    A summary: prompts, responses per prompt, the finished fraction and the file written.
  """
  settings.check()
  device_mesh = make_mesh(mesh)
  policy = load_model(model, "causal", device_mesh, "--model", dtype)
  loaded = load_prompts(prompts, policy.tokenizer, max_prompt_len, prompt_column, on_bad_row)
  log.info("sampling %d prompts x %d from %s (mesh %s)", len(loaded), settings.num_samples,
           policy.model_dir, dict(device_mesh.shape))
  responses = sample(policy, loaded, settings, device_mesh)
  write_jsonl(out, comparison_rows(loaded, responses, settings.num_samples))
  return dict(prompts=len(loaded), num_samples=settings.num_samples,
              finished=float(np.mean(responses.has_eos)), out=out)
