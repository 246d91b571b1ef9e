"""Python reward functions: `--config.ppo.reward_fn=path/to/file.py:name` (or `module:name`).

A reward function is called on the host, once per rollout, with the decoded text of this
process's rows:

    def name(prompts: list[str], responses: list[str]) -> list[float]: ...

`prompts[i]` is the dataset's prompt as the loader read it (`data.load_prompts(...).texts`:
a chat row's rendered template, a plain prompt without trailing whitespace); `responses[i]`
is the sampled reply up to (not including) its stop token, decoded with
`skip_special_tokens=True` (`response_texts`). The function returns one finite number per
row; anything else is a one-line `UserError` naming the function and the row.

    fn = reward_fns.load("rewards.py:brevity")      # ConfigError naming ppo.reward_fn
    scores = fn(prompts, responses)                 # float64 [n], checked
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from rlhf_jax.errors import ConfigError, UserError

FIELD = "ppo.reward_fn"


def split_spec(spec: str) -> tuple[str, str]:
  """`file.py:name` / `package.module:name` -> (source, name); ValueError when malformed.

  The last colon splits, so a path may hold colons of its own (a Windows drive letter).
  """
  source, sep, name = spec.rpartition(":")
  if not sep or not source.strip() or not name.isidentifier():
    raise ValueError("path/to/file.py:function or package.module:function")
  return source, name


def is_file_spec(source: str) -> bool:
  """Whether the source part names a file (rather than an importable module)."""
  return source.endswith(".py") or os.sep in source or "/" in source or \
      source.startswith(("~", "."))


class RewardFn:
  """A loaded reward function that checks what it returns.

  Attributes:
    spec: what the user wrote (`file.py:name`), used in every message.
    fn: the user's callable.
  """

  def __init__(self, spec: str, fn: Callable):
    self.spec = spec
    self.fn = fn

  def __repr__(self) -> str:
    return f"RewardFn({self.spec!r})"

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Scores of `responses` to `prompts` as float64 [n].

    Raises:
      UserError: one line naming the function when it raises or returns something other
        than one finite number per row.
    """
    n = len(responses)
    try:
      out = self.fn(list(prompts), list(responses))
    except Exception as e:  # pylint: disable=broad-except  # the user's code: any error
      raise UserError(f"{FIELD}={self.spec} raised {type(e).__name__}: "
                      f"{_one_line(str(e)) or '(no message)'} (scoring {n} responses)") from e
    return check_scores(out, n, self.spec)


def check_scores(out, n: int, spec: str) -> np.ndarray:
  """`out` as float64 [n], or a one-line UserError saying what is wrong and where."""
  where = f"{FIELD}={spec}"
  if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
    raise UserError(f"{where} returned {_short(out)} ({type(out).__name__}): expected a "
                    f"list of {n} numbers, one per response")
  if hasattr(out, "__array__") and not isinstance(out, (list, tuple)):  # numpy / jax / torch
    arr = np.asarray(out)
    if arr.ndim != 1:
      raise UserError(f"{where} returned an array of shape {arr.shape} for {n} responses: "
                      f"expected shape ({n},)")
    values = arr.tolist()
  else:
    values = list(out)
  if len(values) != n:
    raise UserError(f"{where} returned {len(values)} scores for {n} responses: expected one "
                    "number per response")
  scores = np.zeros((n,), np.float64)
  for i, v in enumerate(values):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
      raise UserError(f"{where} returned {_short(v)} ({type(v).__name__}) at row {i}: "
                      "expected a number")
    if not math.isfinite(float(v)):
      raise UserError(f"{where} returned {float(v)} at row {i}: expected a finite number")
    scores[i] = float(v)
  return scores


def load(spec: str, field: str = FIELD) -> RewardFn:
  """Imports the function `spec` names (a file path or a module, then `:name`).

  Raises:
    ConfigError: naming `field` when the file or module cannot be found or imported, or has
      no callable of that name.
  """
  try:
    source, name = split_spec(spec)
  except ValueError as e:
    raise ConfigError(field, spec, str(e)) from None
  if is_file_spec(source):
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.isfile(path):
      raise ConfigError(field, spec, f"an existing Python file (no file {path})")
    module_name = "_rlhf_jax_reward_fn_" + "".join(c if c.isalnum() else "_" for c in path)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
      raise ConfigError(field, spec, "a Python source file (.py)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module   # dataclasses / pickling inside it look itself up
    try:
      module_spec.loader.exec_module(module)
    except Exception as e:  # pylint: disable=broad-except  # the user's file: any error
      sys.modules.pop(module_name, None)
      raise ConfigError(field, spec, f"a file that imports cleanly (it raised "
                        f"{type(e).__name__}: {_one_line(str(e))})") from None
  else:
    try:
      module = importlib.import_module(source)
    except ImportError as e:
      raise ConfigError(field, spec, f"an importable module ({_one_line(str(e))})") from None
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(field, spec, f"a module that imports cleanly (it raised "
                        f"{type(e).__name__}: {_one_line(str(e))})") from None
  fn = getattr(module, name, None)
  if fn is None:
    raise ConfigError(field, spec, f"a function {name!r} in {source} (it has none)")
  if not callable(fn):
    raise ConfigError(field, spec, f"{name!r} in {source} to be callable (it is a "
                      f"{type(fn).__name__})")
  return RewardFn(spec, fn)


def response_texts(tokenizer, tokens: np.ndarray, mask: np.ndarray,
                   stop_ids: Optional[Sequence[int]] = ()) -> list:
  """Each sampled response as text: its valid tokens up to the first stop id, decoded
  with `skip_special_tokens=True`.

  Args:
    tokens, mask: [n, N] host arrays from the sampler (right padded; mask 1 on sampled
      tokens, the stop token included).
    stop_ids: the ids a response ends at (not part of its text).
  """
  stops = set(int(s) for s in (stop_ids or ()))
  rows = []
  for ids, m in zip(np.asarray(tokens), np.asarray(mask)):
    kept = []
    for t, valid in zip(ids.tolist(), m.tolist()):
      if not valid or t in stops:
        break
      kept.append(t)
    rows.append(kept)
  return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _one_line(text: str) -> str:
  return " ".join(text.split())[:300]


def _short(value) -> str:
  text = _one_line(repr(value))
  return text if len(text) <= 60 else text[:57] + "..."
