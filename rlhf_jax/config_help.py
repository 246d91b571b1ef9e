"""What the launcher tells a user about config fields: every field with its default and
comment (`--helpfull`), and the closest real fields to a mistyped one."""

from __future__ import annotations

import difflib
import os
import re

import ml_collections

# Where the fields' comments are written (next to their defaults).
_SOURCES = ("config.py", os.path.join("pipeline", "settings.py"))


def leaves(c: ml_collections.ConfigDict, prefix: str = "") -> list:
  """(dotted path, value) of every leaf field."""
  out = []
  for key, value in c.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out += leaves(value, path + ".")
    else:
      out.append((path, value))
  return out


def _comments() -> dict:
  """field name -> the comment on the line that sets its default (first one found)."""
  here = os.path.dirname(os.path.abspath(__file__))
  found: dict = {}
  inline = re.compile(r"(?:^|[\s(,.])(\w+)\s*=\s*[^#\n]*?#\s*(.+)$")
  assigned = re.compile(r"^\s*c(?:\.\w+)*\.(\w+)\s*=")     # c.model.dtype = ...
  for source in _SOURCES:
    above: list = []                  # the comment block just above a line
    with open(os.path.join(here, source)) as f:
      for line in f:
        stripped = line.strip()
        if stripped.startswith("#"):
          above.append(stripped.lstrip("# "))
          continue
        m, a = inline.search(line), assigned.search(line)
        if m and m.group(1) not in found:
          found[m.group(1)] = m.group(2).strip()
        elif a and above and a.group(1) not in found:
          found[a.group(1)] = " ".join(above)
        above = []
  return found


def field_lines(c: ml_collections.ConfigDict) -> list:
  """`--config.a.b=<default>  # comment` for every field of `c`."""
  comments = _comments()
  lines = []
  for path, value in leaves(c):
    note = comments.get(path.rsplit(".", 1)[-1], "")
    lines.append(f"--config.{path}={value!r}" + (f"  # {note}" if note else ""))
  return lines


def closest(c: ml_collections.ConfigDict, path: str, n: int = 3) -> list:
  """The real field paths nearest to a mistyped `path` (by spelling)."""
  paths = [p for p, _ in leaves(c)]
  near = difflib.get_close_matches(path, paths, n=n, cutoff=0.6)
  if not near:   # a wrong leaf under a right parent: compare the last names only
    leaf = path.rsplit(".", 1)[-1]
    near = [p for p in paths if p.rsplit(".", 1)[-1] in
            difflib.get_close_matches(leaf, [q.rsplit(".", 1)[-1] for q in paths], n=n)]
  return near[:n]
