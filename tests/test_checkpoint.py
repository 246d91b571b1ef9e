"""Tests for rlhf_jax.checkpoint: round trips, retention, sharded restore, crash safety."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import checkpoint, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed: int = 0, shardings=None):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((16, 8), dtype=np.float32)),
            "b": jnp.asarray(rng.standard_normal((8,), dtype=np.float32))}
  if shardings is not None:
    params = jax.device_put(params, shardings)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  # One real update so the moments and count are not trivial.
  grads = jax.tree.map(lambda x: x * 0.5, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"step": jnp.asarray(seed, jnp.int32), "params": params, "opt_state": opt_state,
          "key": jax.random.key(seed),            # typed key: orbax stores it natively
          "raw_key": jax.random.PRNGKey(seed)}    # raw uint32[2]


def _assert_state_equal(a, b):
  a = dict(a, key=jax.random.key_data(a["key"]))
  b = dict(b, key=jax.random.key_data(b["key"]))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_round_trip_with_extra(tmp_path):
  state = _state(3)
  extra = {"data": {"epoch": 1, "position": 1234, "order_seed": 7}, "kl_coef": 0.0213,
           "name": "ppo", "history": [1.5, 2.5]}
  with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:
    assert ckpt.restore_latest(_abstract(state)) is None
    assert ckpt.save(3, state, extra=extra)
  with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:   # a fresh process would do this
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
    restored, restored_extra = ckpt.restore_latest(_abstract(state))
    assert restored_extra == extra
    _assert_state_equal(restored, state)
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    # Concrete arrays work as the target too; extra_json is the contract's alias.
    ckpt.save(4, state, extra_json={"x": 1})
    restored, restored_extra = ckpt.restore_latest(state)
    assert restored_extra == {"x": 1}
    _assert_state_equal(restored, state)


def test_max_to_keep_and_interval(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2, save_interval_steps=2)
  state = _state()
  for step in (2, 4, 6, 8):
    assert ckpt.save(step, state, extra={"step": step})
  assert not ckpt.save(9, state)                     # not a multiple of 2
  assert ckpt.save(9, state, force=True)
  with pytest.raises(TypeError, match="must be JSON"):
    ckpt.save(10, state, extra={"a": np.zeros(2)})
  assert ckpt.all_steps() == [8, 9]
  assert ckpt.restore_latest(_abstract(state))[1] == {}
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "ck")) == ["8", "9"]


def test_restore_with_sharded_target(tmp_path):
  state = _state(1)                                  # saved from one device
  ckpt = checkpoint.Checkpointer(tmp_path / "ck")
  ckpt.save(1, state, extra={})
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  specs = {"w": P("fsdp", None), "b": P("fsdp")}
  param_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  repl = sharding.replicated(mesh)
  target = jax.eval_shape(lambda: _state(1))
  target_sh = dict(jax.tree.map(lambda _: repl, target),
                   params=param_sh,
                   opt_state=optax.tree_map_params(optax.adam(1e-2), lambda _, s: s,
                                                   target["opt_state"], param_sh,
                                                   transform_non_params=lambda _: repl))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        target, target_sh)
  restored, _ = ckpt.restore_latest(target)
  _assert_state_equal(restored, state)
  assert restored["params"]["w"].sharding == param_sh["w"]
  assert restored["opt_state"][0].mu["w"].sharding == param_sh["w"]
  assert sharding.per_device_bytes(restored["params"]["w"]) == 16 * 8 * 4 // 4
  # And back: a sharded save restores onto a different mesh.
  ckpt.save(2, restored, extra={})
  mesh8 = sharding.make_mesh(dict(data=8))
  target8 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=sharding.replicated(mesh8)),
                         target)
  again, _ = ckpt.restore_latest(target8)
  _assert_state_equal(again, state)
  ckpt.close()


def _corrupt_truncate(step_dir):
  data = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
          if os.sep + "d" + os.sep in os.path.join(r, f)]
  assert data, "expected OCDBT data files"
  for path in data:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _corrupt_delete_manifest(step_dir):
  manifests = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
               if f == "manifest.ocdbt"]
  assert manifests
  for m in manifests:
    os.remove(m)


def _corrupt_extra(step_dir):
  with open(step_dir / "extra" / "metadata", "r+b") as f:
    f.truncate(3)


# A failed tensorstore read leaves a callback on a closed asyncio loop: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_delete_manifest,
                                     _corrupt_extra])
def test_corrupted_latest_falls_back(tmp_path, caplog, corrupt):
  d = tmp_path / "ck"
  with checkpoint.Checkpointer(d) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step), extra={"step": step})
  corrupt(d / "3")
  with checkpoint.Checkpointer(d) as ckpt:
    with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
      restored, extra = ckpt.restore_latest(_abstract(_state(0)))
    assert extra == {"step": 2}
    _assert_state_equal(restored, _state(2))
    assert "checkpoint step 3" in caplog.text and "could not be restored" in caplog.text
    assert ckpt.all_steps() == [1, 2]
    assert any(n.startswith("3" + checkpoint.CORRUPT_SUFFIX) for n in os.listdir(d))
    # The resumed run reaches step 3 again and saves it normally.
    assert ckpt.save(3, _state(3), extra={"step": 3})
    assert ckpt.restore_latest(_abstract(_state(0)))[1] == {"step": 3}


def test_nothing_restorable_raises(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, {"a": jnp.zeros((2,))})
    with pytest.raises(RuntimeError, match="none of the checkpoints"):
      ckpt.restore_latest({"a": jax.ShapeDtypeStruct((3, 4), jnp.float32),
                           "b": jax.ShapeDtypeStruct((), jnp.int32)})


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    from rlhf_jax import checkpoint
    mode, directory = sys.argv[1], sys.argv[2]
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None)
    big = lambda s: {"x": jnp.full((1 << 20,), float(s)), "s": jnp.int32(s)}
    ckpt.save(1, big(1), extra={"step": 1})
    if mode == "before_rename":
      # Die after every byte is written but before the atomic rename commits the step.
      from orbax.checkpoint._src.path import atomicity
      atomicity.AtomicRenameTemporaryPath.finalize = (
          lambda self: os.kill(os.getpid(), signal.SIGKILL))
      ckpt.save(2, big(2), extra={"step": 2})
    else:  # "anytime": keep saving until the parent kills us
      print("saving", flush=True)
      for s in range(2, 10_000):
        ckpt.save(s, big(s), extra={"step": s})
""")


@pytest.mark.parametrize("mode", ["before_rename", "anytime"])
def test_killed_save_is_never_restored(tmp_path, mode):
  d = tmp_path / "ck"
  script = tmp_path / "save.py"
  script.write_text(_KILLED_SAVE)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if mode == "before_rename":
    proc = subprocess.run([sys.executable, str(script), mode, str(d)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n]
    assert leftovers and leftovers[0].startswith("2."), os.listdir(d)
  else:
    proc = subprocess.Popen([sys.executable, str(script), mode, str(d)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
      assert proc.stdout.readline().strip() == "saving"
      proc.stdout.close()
      try:
        proc.wait(timeout=1.5)
      except subprocess.TimeoutExpired:
        pass
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
      if proc.poll() is None:
        proc.kill()
  with checkpoint.Checkpointer(d, max_to_keep=None) as ckpt:
    target = {"x": jax.ShapeDtypeStruct((1 << 20,), jnp.float32),
              "s": jax.ShapeDtypeStruct((), jnp.int32)}
    state, extra = ckpt.restore_latest(target)
    step = ckpt.latest_step()
    if mode == "before_rename":
      assert step == 1
    assert extra == {"step": step} and int(state["s"]) == step
    np.testing.assert_array_equal(np.asarray(state["x"]), float(step))
    # Leftover tmp dirs of the killed save are cleaned up when the directory is opened.
    ckpt.save(step + 1, state)
  assert not [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n], os.listdir(d)


def test_async_save(tmp_path):
  state = _state(5)
  with checkpoint.Checkpointer(tmp_path / "ck", async_save=True) as ckpt:
    assert ckpt.save(5, state, extra={"a": 1})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5]
    restored, extra = ckpt.restore_latest(_abstract(state))
  assert extra == {"a": 1}
  _assert_state_equal(restored, state)
