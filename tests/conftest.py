"""Shared test setup: 8 fake CPU devices for every test file.

Must run before any JAX backend is initialised (pytest imports conftest first), so that
sharding tests can build (8,1,1), (2,4,1), (2,2,2) and (1,4,2) meshes. Single-device code
is unaffected: un-sharded arrays live on device 0 and one-device meshes use
`jax.devices()[:1]`.
"""

import os
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)

# Trainers called directly (not through run.run, which uses <workdir>/data_cache) would
# write their token caches to ~/.cache: keep them in one temp dir per test session instead
# (the launcher subprocesses inherit it).
os.environ.setdefault("RLHF_JAX_DATA_CACHE", tempfile.mkdtemp(prefix="rlhf_jax_data_cache_"))

# One persistent XLA compilation cache for the session's launcher subprocesses (the xdist
# workers inherit the variable and pass it on): many launcher tests compile the same `:tiny` stages,
# and a subprocess that finds them compiled starts in seconds. Fresh per session, so the
# suite's wall time on a clean machine is what CI sees.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# ... but not in this process: in-process tests read compiled executables' HLO and memory
# analysis, and count compilations.
jax.config.update("jax_compilation_cache_dir", None)
