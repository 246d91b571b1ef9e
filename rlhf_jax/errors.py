"""User-facing errors.

A `UserError` is a mistake the user can fix (bad config value, missing path, malformed data).
`launch/train.py` prints its message without a traceback and exits non-zero; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """A problem with the user's config, paths or data; the message says what to fix."""


class ConfigError(UserError):
  """A config field has a value that is not allowed."""

  def __init__(self, field: str, value, expected: str):
    self.field = field
    super().__init__(f"config.{field}={value!r}: expected {expected}")


class DivergenceError(UserError):
  """Training stopped because updates were non-finite too many times in a row."""
