"""Markdown tables and PNG plots for the evaluation reports (`report.md`).

The built-in task's report (`pipeline/report.py`) and the policy comparison of
`launch/evaluate.py` (`compare.py`) draw with these, so both reports look alike.

    lines = reporting.table(["metric", "value"], [["win rate", "0.61"]])
    reporting.cell(text)                              # one table cell: escaped, one line
    plt = reporting.pyplot()                          # matplotlib on the file-only backend
    reporting.save_figure(fig, path)                  # tight layout, 100 dpi, closed
    reporting.score_histograms(path, {"reward model": {"A": [...], "B": [...]}})
    reporting.score_differences(path, {"reward model": [a - b, ...]})
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence


def cell(text: str) -> str:
  """A markdown table cell: "∅" for an empty text, pipes escaped, newlines as spaces."""
  return (text or "∅").replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list:
  """The lines of a markdown table; cells are written as given (see `cell`)."""
  return (["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
          + ["| " + " | ".join(row) + " |" for row in rows])


def pyplot():
  """`matplotlib.pyplot` on the Agg backend (files only: no display on a cluster node)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str) -> str:
  """Writes `fig` as a PNG at 100 dpi after a tight layout, closes it, returns `path`."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  pyplot().close(fig)
  return path


def score_histograms(path: str, panels: Mapping[str, Mapping[str, Sequence[float]]],
                     bins: int = 30) -> str:
  """One panel per judge: overlaid histograms of each model's scores on shared bins.

  Args:
    path: the PNG to write.
    panels: judge name -> {model name -> scores}.
    bins: number of bins spanning all of a panel's scores.
  """
  import numpy as np
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (judge, by_model) in zip(axes[0], panels.items()):
    values = np.concatenate([np.asarray(v, float) for v in by_model.values()])
    lo, hi = float(values.min()), float(values.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    for name, scores in by_model.items():
      ax.hist(scores, bins=edges, alpha=0.55, label=f"{name} (mean {np.mean(scores):.3f})")
    ax.set_title(f"{judge}: score per response")
    ax.set_xlabel("score")
    ax.set_ylabel("responses")
    ax.legend()
  return save_figure(fig, path)


def score_differences(path: str, panels: Mapping[str, Sequence[float]]) -> str:
  """One panel per judge: each prompt's score difference, sorted, with zero marked.

  Args:
    path: the PNG to write.
    panels: judge name -> per-prompt differences (policy score - baseline score).
  """
  import numpy as np
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (judge, diffs) in zip(axes[0], panels.items()):
    diffs = np.sort(np.asarray(diffs, float))
    colors = np.where(diffs > 0, "tab:green", np.where(diffs < 0, "tab:red", "tab:gray"))
    ax.bar(np.arange(len(diffs)), diffs, width=1.0, color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(f"{judge}: policy − baseline per prompt")
    ax.set_xlabel("prompts, sorted by difference")
    ax.set_ylabel("score difference")
  return save_figure(fig, path)


def image_links(paths: Sequence[str]) -> list:
  """Markdown image lines for plots written next to the report."""
  return [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths]
