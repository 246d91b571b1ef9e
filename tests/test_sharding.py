"""Tests for rlhf_jax.sharding on 8 fake CPU devices (set in conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def _mesh(shape):
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


def test_eight_fake_devices():
  assert jax.device_count() == 8, "tests/conftest.py must set jax_num_cpu_devices=8"


@pytest.mark.parametrize("shape", MESHES)
def test_make_mesh_shapes(shape):
  mesh = _mesh(shape)
  assert mesh.axis_names == sharding.MESH_AXES
  assert tuple(mesh.shape.values()) == shape
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("spec,expected", [
    (dict(data=-1), (8, 1, 1)),
    (dict(data=-1, fsdp=1, tensor=1), (8, 1, 1)),
    (dict(data=2, fsdp=-1), (2, 4, 1)),
    (dict(fsdp=4, tensor=-1), (1, 4, 2)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
])
def test_make_mesh_rest(spec, expected):
  assert tuple(sharding.make_mesh(spec).shape.values()) == expected


@pytest.mark.parametrize("spec,field", [
    (dict(data=3, fsdp=-1), "mesh.data=3"),
    (dict(data=2, fsdp=3, tensor=1), "mesh.fsdp=3"),
    (dict(data=2, fsdp=2, tensor=1), "covers 4 devices but 8"),
    (dict(data=-1, fsdp=-1), "mesh.fsdp=-1"),
    (dict(data=0), "mesh.data=0"),
    (dict(data=-1, model=2), "mesh.model"),
    (dict(data=16), "mesh.data=16"),
])
def test_make_mesh_errors_name_the_field(spec, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    sharding.make_mesh(spec)


def test_make_mesh_one_device():
  mesh = sharding.make_mesh(dict(data=-1), devices=jax.devices()[:1])
  assert tuple(mesh.shape.values()) == (1, 1, 1)
  x = jax.device_put(np.arange(4.0), sharding.batch_sharding(mesh, 1))
  assert float(jnp.sum(x)) == 6.0


def test_logical_to_specs_without_shapes():
  axes = {
      "embed": {"embedding": ("vocab", "embed")},
      "attn": {"q": ("embed", "heads", "head_dim"), "o": ("heads", "head_dim", "embed")},
      "norm": ("embed",),
      "head_bias": (None,),
      "scalar": None,
      "repeat": ("mlp", "heads"),          # both -> tensor: the second is dropped
      "batchy": ("batch", "length", "embed"),  # batch takes data+fsdp, embed loses fsdp
  }
  specs = sharding.logical_to_specs(axes, sharding.DEFAULT_RULES)
  assert specs == {
      "embed": {"embedding": P("tensor", "fsdp")},
      "attn": {"q": P("fsdp", "tensor", None), "o": P("tensor", None, "fsdp")},
      "norm": P("fsdp"),
      "head_bias": P(None),
      "scalar": P(),
      "repeat": P("tensor", None),
      "batchy": P(("data", "fsdp"), None, None),
  }


def test_logical_to_specs_divisibility_fallback():
  mesh = _mesh((2, 2, 2))
  axes = {"emb": ("vocab", "embed"), "mlp": ("embed", "mlp"), "x": ("batch", "embed")}
  shapes = {"emb": jax.ShapeDtypeStruct((101, 16), jnp.float32),   # vocab 101: not / 2
            "mlp": jax.ShapeDtypeStruct((16, 6), jnp.float32),
            "x": jax.ShapeDtypeStruct((6, 3), jnp.float32)}       # 6 rows: data only
  specs = sharding.logical_to_specs(axes, sharding.DEFAULT_RULES, shapes_tree=shapes,
                                    mesh=mesh)
  assert specs == {"emb": P(None, "fsdp"), "mlp": P("fsdp", "tensor"), "x": P("data", None)}


def test_logical_to_specs_errors():
  with pytest.raises(ValueError, match="'bogus' has no sharding rule"):
    sharding.logical_to_specs({"w": ("bogus",)}, sharding.DEFAULT_RULES)
  mesh = _mesh((8, 1, 1))
  with pytest.raises(ValueError, match=r"\['w'\]: logical axes .* 2 dims"):
    sharding.logical_to_specs({"w": ("embed", "mlp")}, sharding.DEFAULT_RULES,
                              shapes_tree={"w": np.zeros(3)}, mesh=mesh)
  with pytest.raises(ValueError, match="needs the mesh"):
    sharding.logical_to_specs({"w": ("embed",)}, sharding.DEFAULT_RULES,
                              shapes_tree={"w": np.zeros(3)})


def _init_fn():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"embedding": jax.random.normal(k1, (128, 64)),
          "mlp": {"up": jax.random.normal(k2, (64, 256)), "down": jax.random.normal(k3, (256, 64))},
          "scale": jnp.ones((64,))}


AXES = {"embedding": ("vocab", "embed"), "mlp": {"up": ("embed", "mlp"), "down": ("mlp", "embed")},
        "scale": ("embed",)}


def test_init_sharded_really_splits_under_fsdp():
  mesh = _mesh((1, 8, 1))
  params = sharding.init_sharded(mesh, _init_fn, AXES, sharding.DEFAULT_RULES)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  assert sharding.per_device_bytes(params) == total // 8
  assert params["mlp"]["up"].sharding.spec == P("fsdp", "tensor")  # tensor has size 1
  # Born sharded with the same values as an unsharded init.
  ref = _init_fn()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Replicated on the (8,1,1) data mesh: every device holds everything.
  rep = sharding.init_sharded(_mesh((8, 1, 1)), _init_fn, AXES, sharding.DEFAULT_RULES)
  assert sharding.per_device_bytes(rep) == total


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_matmul_matches_unsharded(shape):
  mesh = _mesh(shape)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 64), dtype=np.float32)
  w = rng.standard_normal((64, 32), dtype=np.float32)
  w_spec = sharding.logical_to_specs(("embed", "mlp"), sharding.DEFAULT_RULES,
                                     shapes_tree=w, mesh=mesh)
  w_shard = NamedSharding(mesh, w_spec)
  x_shard = sharding.batch_sharding(mesh, 2)
  out_shard = NamedSharding(mesh, P(sharding.BATCH_AXES, "tensor"))
  f = jax.jit(lambda x, w: jnp.tanh(x @ w), in_shardings=(x_shard, w_shard),
              out_shardings=out_shard)
  out = f(sharding.host_to_global(mesh, x), jax.device_put(w, w_shard))
  assert out.sharding.is_equivalent_to(out_shard, 2)
  ref = np.tanh(x.astype(np.float64) @ w.astype(np.float64))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_host_to_global_single_process():
  mesh = _mesh((2, 4, 1))
  batch = {"ids": np.arange(24).reshape(8, 3), "n": np.int32(5)}
  out = sharding.host_to_global(mesh, batch)
  np.testing.assert_array_equal(np.asarray(out["ids"]), batch["ids"])
  assert out["ids"].sharding.spec == P(("data", "fsdp"), None)
  assert len({str(s.index) for s in out["ids"].addressable_shards}) == 8
  assert int(out["n"]) == 5
  with pytest.raises(ValueError, match="6 rows on process 0 does not split"):
    sharding.host_to_global(mesh, {"ids": np.zeros((6, 3))})


def test_replicated():
  mesh = _mesh((2, 2, 2))
  x = jax.device_put(np.ones((4, 4), np.float32), sharding.replicated(mesh))
  assert sharding.per_device_bytes(x) == 64
