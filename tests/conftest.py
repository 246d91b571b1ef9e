"""Shared test setup: 8 fake CPU devices for every test file.

Must run before any JAX backend is initialised (pytest imports conftest first), so that
sharding tests can build (8,1,1), (2,4,1), (2,2,2) and (1,4,2) meshes. Single-device code
is unaffected: un-sharded arrays live on device 0 and one-device meshes use
`jax.devices()[:1]`.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
