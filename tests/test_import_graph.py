"""The import graph of `rlhf_jax` points one way and has no circle.

    launch -> run -> pipeline -> trainers -> objectives -> core (losses, models, data,
    sampling, sharding, workdir, checkpoint, metrics, optim, config, tasks, ...)

Every `import` in the package is read from the source (module-level and inside functions
alike, since a lazy import is still a dependency), resolved to the module it names, and
checked: no module imports one of a higher layer, the trainers never import the built-in
pipeline or task, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import os

import helpers

PACKAGE = os.path.join(helpers.REPO, "rlhf_jax")

# Higher layers may import lower ones, never the reverse. Everything else is the core (0).
LAYERS = {"rlhf_jax.objectives": 1, "rlhf_jax.generation": 1, "rlhf_jax.trainers": 2,
          "rlhf_jax.pipeline": 3, "rlhf_jax.sample_responses": 3, "rlhf_jax.compare": 3,
          "rlhf_jax.run": 4,
          "rlhf_jax.run_lock": 0}   # core: launch/train.py takes the workdir lock
# Core modules the trainers must not see: the built-in task belongs to the pipeline.
NOT_FOR_TRAINERS = ("rlhf_jax.tasks",)


def _modules() -> dict:
  """module name -> source path, for every .py file of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), helpers.REPO)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
            os.path.join(root, f)
  return out


def _imports(name: str, path: str, modules: dict) -> set:
  """The package modules `name` imports (a `from pkg import sub` names the submodule)."""
  is_package = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")
        parts = parts[:len(parts) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:   # `import a.b.c` of a function/class path
        target = target.rpartition(".")[0]
      if target.startswith("rlhf_jax") and target != "rlhf_jax" and target != name:
        found.add(target)
  return found


def _layer(module: str) -> int:
  return max([rank for prefix, rank in LAYERS.items()
              if module == prefix or module.startswith(prefix + ".")] or [0])


def _graph() -> dict:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict) -> list:
  bad = []
  for module, targets in graph.items():
    for target in targets:
      if _layer(target) > _layer(module):
        bad.append(f"{module} -> {target}")
      if _layer(module) == LAYERS["rlhf_jax.trainers"] and target.startswith(NOT_FOR_TRAINERS):
        bad.append(f"{module} -> {target} (the built-in task is the pipeline's)")
  return sorted(bad)


def cycles(graph: dict) -> list:
  """Every back edge of a depth-first search, as the cycle it closes."""
  found, state, stack = [], {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        found.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return found


def test_no_module_imports_a_higher_layer():
  assert upward_imports(_graph()) == []


def test_the_import_graph_has_no_cycle():
  assert cycles(_graph()) == []


def test_the_checks_see_real_edges():
  """The graph is not empty and the checks catch a planted upward import and circle."""
  graph = _graph()
  assert "rlhf_jax.objectives" in graph["rlhf_jax.trainers.ppo"]
  assert "rlhf_jax.trainers.ppo" in graph["rlhf_jax.pipeline.stages"]
  assert {"rlhf_jax.pipeline", "rlhf_jax.trainers.sft"} <= graph["rlhf_jax.run"]
  planted = {k: set(v) for k, v in graph.items()}
  planted["rlhf_jax.trainers.sft"].add("rlhf_jax.pipeline")
  assert upward_imports(planted) == ["rlhf_jax.trainers.sft -> rlhf_jax.pipeline"]
  assert cycles(planted)
