"""Shared pieces of the benchmark harness (`bench/*.py`).

- `matmul_peak_flops()`: this machine's attainable f32 matmul rate through JAX, measured in
  the same process as the benchmark it normalises (the MFU denominator).
- `copy_bandwidth()`: attainable memory bandwidth from a large array copy (the generation
  roofline's denominator).
- FLOP counting from a `ModelConfig` (`forward_flops`, `train_flops`).
- `CompileCounter`: counts XLA backend compilations, so a harness can assert that nothing
  compiles after its warm-up.
- `machine()`, `versions()`, `load()`, `context_cells()`, `publish_rows()`: the context
  every recorded figure carries, and the markdown append into docs/benchmarks.md.

Model FLOPs count the matmuls (2 FLOPs per multiply-add) of the projections, the MLP, the
LM / scalar head and attention's QK^T and PV over the full key length the implementation
computes (masked entries included, as PaLM's MFU definition does); a backward pass is twice
the forward. Norms, softmax, the optimizer and gathers are not counted.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence



# --------------------------------------------------------------------------- shapes

# `--shape` names of the harness -> `models.get_preset` names.
PRESET_SHAPES = {"tiny": "tiny", "small": "small", "gpt2": "gpt2", "gpt2-small": "gpt2",
                 "llama-1b": "llama-1b"}


def add_ppo_shape_args(ap) -> None:
  """The PPO-iteration shape flags, shared by ours and TRL's side (the issue's defaults)."""
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--minibatches", type=int, default=4)
  ap.add_argument("--iterations", type=int, default=2, help="timed iterations after warm-up")


# --------------------------------------------------------------------------- hardware

def _best_time(fn: Callable[[], object], repeats: int) -> float:
  fn()   # compile / warm
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
  """FLOP/s of the best of `repeats` jitted [n,n]@[n,n] matmuls (2n^3 FLOPs each)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  return 2.0 * n ** 3 / _best_time(lambda: mm(a, b).block_until_ready(), repeats)


def copy_bandwidth(mbytes: Optional[int] = None, repeats: int = 5) -> float:
  """Bytes/s of the best jitted copy of a float32 array (read + write counted).

  `mbytes` defaults to 256 MiB on a CPU and 2 GiB on an accelerator: there a 256 MiB copy
  takes ~0.1 ms, the same order as one dispatch and sync, which halved the figure on an
  H200 (1.9 TB/s measured that way against ~4.3 TB/s).
  """
  import jax
  import jax.numpy as jnp
  if mbytes is None:
    mbytes = 256 if jax.devices()[0].platform == "cpu" else 2048
  # `x + 1` (not a no-op copy XLA could elide): one read and one write per element. The input
  # is donated so the output reuses its (already touched) pages: a fresh output buffer
  # would time the kernel's first-touch page faults instead of the memory system.
  cp = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  box = [jnp.ones((mbytes * 2**20 // 4,), jnp.float32)]
  nbytes = box[0].nbytes

  def run():
    box[0] = cp(box[0])
    box[0].block_until_ready()
  return 2.0 * nbytes / _best_time(run, repeats)


# --------------------------------------------------------------------------- FLOPs

def matmul_params(cfg, lm_head: bool = True) -> int:
  """Weights that take part in a matmul per token (embedding lookups excluded)."""
  d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)
  per_layer = d * n * h + 2 * d * k * h + n * h * d + (3 if cfg.gated_mlp else 2) * d * f
  head = d * cfg.vocab_size if lm_head else d
  return cfg.num_layers * per_layer + head


def forward_flops(cfg, tokens: int, key_len: int, lm_head: bool = True,
                  head_tokens: Optional[int] = None) -> float:
  """Forward FLOPs for `tokens` query tokens, each attending over `key_len` keys.

  Args:
    cfg: the ModelConfig.
    tokens: query tokens processed (batch × length).
    key_len: keys each query's attention is computed over.
    lm_head: whether the [D, V] unembedding runs (False: a scalar head).
    head_tokens: tokens the head is applied to (default: all `tokens`).
  """
  head_tokens = tokens if head_tokens is None else head_tokens
  body = matmul_params(cfg, lm_head=False) - (cfg.hidden_size)   # without the head
  head = cfg.hidden_size * (cfg.vocab_size if lm_head else 1)
  attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * key_len
  return 2.0 * body * tokens + 2.0 * head * head_tokens + float(attn) * tokens


def train_flops(cfg, tokens: int, key_len: int, lm_head: bool = True,
                head_tokens: Optional[int] = None) -> float:
  """Forward + backward (3× forward) model FLOPs."""
  return 3.0 * forward_flops(cfg, tokens, key_len, lm_head, head_tokens)


# --------------------------------------------------------------------------- compiles

class CompileCounter:
  """Counts XLA backend compilations (all of them, in this process) while active.

      with CompileCounter() as cc:
        step(...)
      assert cc.count == 0
  """

  _EVENT = "/jax/core/compile/backend_compile_duration"
  _installed = False
  _active: list = []

  def __init__(self):
    self.count = 0

  @classmethod
  def _install(cls):
    if cls._installed:
      return
    import jax

    def listener(event, duration_secs, **kwargs):
      if event == cls._EVENT:
        for c in cls._active:
          c.count += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    cls._installed = True

  def __enter__(self):
    self._install()
    CompileCounter._active.append(self)
    return self

  def __exit__(self, *exc):
    CompileCounter._active.remove(self)
    return False


# --------------------------------------------------------------------------- context

def machine() -> str:
  """'<lscpu model name>, <n> cores'."""
  name = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        name = line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  try:
    import jax
    dev = jax.devices()[0]
    if dev.platform != "cpu":
      return f"{dev.device_kind} ×{jax.device_count()} (host {name}, {os.cpu_count()} cores)"
  except Exception:  # noqa: BLE001  (context only)
    pass
  return f"{name}, {os.cpu_count()} cores"


def versions() -> str:
  import jax
  parts = [f"jax {jax.__version__}"]
  try:
    import flax
    parts.append(f"flax {flax.__version__}")
  except ImportError:
    pass
  return ", ".join(parts)


def load() -> float:
  """1-minute load average."""
  return os.getloadavg()[0]


def command_line(argv: Optional[Sequence[str]], script: str) -> str:
  args = list(argv) if argv is not None else sys.argv[1:]
  return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script)] + args)


def today() -> str:
  return str(datetime.date.today())


def append_section_rows(path: str, section: str, intro: str, header: str,
                        rows: Sequence[str], notes: str = "") -> None:
  """Appends table `rows` to `section` of markdown file `path` (created if absent).

  The section is `section` (a '## ...' line), `intro`, then the table `header` (header and
  separator lines). Rows go after the section's last table row; `notes` (free markdown)
  after the table.
  """
  text = open(path).read() if os.path.exists(path) else (
      "# Benchmarks\n\nMeasured numbers, newest rows last in each table.\n")
  lines = text.splitlines(keepends=True)
  try:
    start = next(i for i, l in enumerate(lines) if l.strip() == section)
  except StopIteration:
    text = (text.rstrip("\n") + "\n\n" + section + "\n\n" + intro.strip("\n") + "\n\n"
            + header + "".join(r + "\n" for r in rows))
    if notes:
      text += "\n" + notes.strip("\n") + "\n"
  else:
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
               len(lines))
    table = [j for j in range(start + 1, end) if lines[j].startswith("|")]
    i = (table[-1] + 1) if table else end
    lines[i:i] = [r + "\n" for r in rows]
    if notes:
      end = next((j for j in range(i + len(rows), len(lines)) if lines[j].startswith("## ")),
                 len(lines))
      lines[end:end] = ["\n" if lines[end - 1].strip() else "", notes.strip("\n") + "\n"]
    text = "".join(lines)
  with open(path, "w") as f:
    f.write(text)


def shape_cell(name: str, cfg) -> str:
  """'gpt2 (12×768, V 50257)': a row's shape cell."""
  return f"{name} ({cfg.num_layers}×{cfg.hidden_size}, V {cfg.vocab_size})"


def context_cells(loads: Sequence[float], argv: Optional[Sequence[str]], script: str,
                  extra_versions: str = "") -> str:
  """The closing cells of every recorded row: '| machine, load a→b | versions | `cmd` |'."""
  load = "→".join(f"{x:.1f}" for x in loads)
  return (f"| {machine()}, load {load} | {versions()}{extra_versions} "
          f"| `{command_line(argv, script)}` |")


def publish_rows(path: Optional[str], section: str, intro: str, header: str,
                 rows: Sequence[str]) -> None:
  """Prints the table; appends `rows` to `section` of markdown file `path` when given."""
  print(header + "\n".join(rows), flush=True)
  if path:
    append_section_rows(path, section, intro, header, rows)
    print(f"# appended to {path}")
