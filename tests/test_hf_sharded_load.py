"""The sharded HF loader equals `load_hf` and reads only shard-sized slices; streamed saves load.

References: `models.load_hf` (the host loader, itself checked against transformers in
tests/test_hf_roundtrip.py) must give bit-identical float32 params to
`models.load_hf_sharded` on 8 fake devices, under FSDP and tensor sharding, for GPT-2
(fused Conv1D qkv), Llama (GQA, bfloat16 on disk), Qwen2 (tied embeddings), GPT-NeoX
(per-head fused qkv, float16 on disk), scalar models (score head, sidecar bias, appended pad
row) and a checkpoint split over several files. Every read is logged: each one must be the
size of the device shard that asked for it (GPT-NeoX's interleaved qkv reads a box at most
3x that). The streamed `save_hf` (several files + index) must load in transformers with
logits equal to ours. Two processes (bench/load_memory.py's worker) load and save a
checkpoint whose params are split across them.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the transformers reference")
transformers = pytest.importorskip("transformers")

from rlhf_jax import models, sharding  # pylint: disable=wrong-import-position
from rlhf_jax.trainers import state as state_lib  # pylint: disable=wrong-import-position

import test_hf_roundtrip as rt  # pylint: disable=wrong-import-position

MESHES = {"fsdp8": {"fsdp": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4}}


def _hf_checkpoint(tmp_path, family, dtype=torch.float32, scalar=False, **save_kw):
  cls = transformers.AutoModelForSequenceClassification if scalar else None
  extra = dict(num_labels=1) if scalar else {}
  model = rt._hf_model(family, cls=cls, **extra)  # pylint: disable=protected-access
  out = tmp_path / f"{family}-{'scalar' if scalar else 'causal'}"
  model.to(dtype).save_pretrained(out, **save_kw)
  return out, model


def _load_sharded(path, mesh_shape, kind=None):
  """load_hf_sharded on a mesh, logging (stored name, elements) of every file read."""
  mesh = sharding.make_mesh(mesh_shape)
  reads = []
  real_read = models.hf._Tensors.read  # pylint: disable=protected-access

  def logged_read(self, name, index):
    out = real_read(self, name, index)
    reads.append((name, out.size))
    return out

  models.hf._Tensors.read = logged_read  # pylint: disable=protected-access
  try:
    cfg, stored_kind, params = models.load_hf_sharded(
        path, lambda c, k: state_lib.model_shardings(mesh, c, k, sharding.DEFAULT_RULES),
        kind=kind)
  finally:
    models.hf._Tensors.read = real_read  # pylint: disable=protected-access
  return cfg, stored_kind, params, reads, mesh


def _assert_equal_trees(want, got):
  want_leaves = jax.tree_util.tree_leaves_with_path(want)
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  assert [p for p, _ in want_leaves] == [p for p, _ in got_leaves]
  for (path, a), (_, b) in zip(want_leaves, got_leaves):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def _shard_elements(cfg, kind, params):
  """Stored tensor name -> elements of one device shard of (each of) its params."""
  out = {}
  for name, paths, _, _ in models.hf._entries(cfg, kind):  # pylint: disable=protected-access
    sizes = {int(np.prod(models.hf._get(params, p).sharding.shard_shape(  # pylint: disable=protected-access
        models.hf._get(params, p).shape))) for p in paths}  # pylint: disable=protected-access
    assert len(sizes) == 1
    out[name] = sizes.pop()
  out["embed_out.weight"] = out.get("lm_head.weight")  # GPT-NeoX's stored name (4.x)
  return out


def _check_reads(cfg, kind, params, reads, slack=1):
  """Every read is one device shard's elements (<= slack x for interleaved layouts)."""
  want = _shard_elements(cfg, kind, params)
  assert reads
  for name, n in reads:
    assert want[name] <= n <= slack * want[name], (name, n, want[name])


CASES = [  # (family, on-disk dtype, scalar, interleaved-layout slack)
    ("gpt2", torch.float32, False, 1),
    ("llama", torch.bfloat16, False, 1),
    ("qwen2", torch.float32, False, 1),     # tied embeddings: no lm_head tensor
    ("gpt_neox", torch.float16, False, 3),  # per-head fused q|k|v rows
    ("llama", torch.float32, True, 1),      # score head
]


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("family,dtype,scalar,slack", CASES)
def test_sharded_load_equals_host_load(family, dtype, scalar, slack, mesh_name, tmp_path):
  path, _ = _hf_checkpoint(tmp_path, family, dtype, scalar)
  cfg, want = models.load_hf(path)
  cfg2, kind, got, reads, mesh = _load_sharded(path, MESHES[mesh_name])
  assert cfg2 == cfg and kind == ("scalar" if scalar else "causal")
  _assert_equal_trees(want, got)
  # Placed as the trainers' shardings say, and actually split (8 shards of the embedding).
  specs = state_lib.model_shardings(mesh, cfg, kind, sharding.DEFAULT_RULES)
  assert jax.tree.map(lambda x: x.sharding, got) == specs
  emb = got["backbone"]["embed"]["embedding"]
  assert len({str(i) for i in emb.sharding.devices_indices_map(emb.shape).values()}) == 8
  _check_reads(cfg, kind, got, reads, slack)
  read_total = sum(n for _, n in reads)
  assert read_total <= slack * 8 * models.param_count(got)


def test_index_json_checkpoint_and_causal_as_scalar(tmp_path):
  path, _ = _hf_checkpoint(tmp_path, "llama", torch.bfloat16, max_shard_size="20KB")
  assert (path / "model.safetensors.index.json").exists()
  cfg, want = models.load_hf(path)
  _, kind, got, reads, _ = _load_sharded(path, {"fsdp": 4, "tensor": 2})
  assert kind == "causal"
  _assert_equal_trees(want, got)
  _check_reads(cfg, kind, got, reads)
  # Read for a value / reward model: the backbone only, never the LM head.
  _, kind, backbone, reads, _ = _load_sharded(path, {"fsdp": 8}, kind="scalar")
  assert kind == "causal" and set(backbone) == {"backbone"}
  assert "lm_head.weight" not in {name for name, _ in reads}
  _assert_equal_trees(want["backbone"], backbone["backbone"])


def test_scalar_sidecar_bias_and_pad_row(tmp_path):
  """Our own scalar export: the head bias lives in the sidecar, a pad row was appended."""
  cfg = models.ModelConfig(**rt_cfg(), eos_token_id=2, pad_token_id=2)
  params = models.causal_to_scalar(cfg, models.init(cfg, 0), 1)
  params["head"]["bias"] = params["head"]["bias"] + 0.25
  with pytest.warns(UserWarning, match="bias"):
    models.save_hf(cfg, params, tmp_path / "rm")
  assert json.loads((tmp_path / "rm" / "rlhf_jax.json").read_text())["score_pad_row"]
  _, want = models.load_hf(tmp_path / "rm")
  cfg2, kind, got, reads, _ = _load_sharded(tmp_path / "rm", {"fsdp": 8})
  assert cfg2 == cfg and kind == "scalar"
  _assert_equal_trees(want, got)
  _assert_equal_trees(params, got)
  _check_reads(cfg, kind, got, reads)


def rt_cfg():
  return dict(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64)


def test_errors_name_the_tensor_and_file(tmp_path):
  from safetensors.numpy import load_file, save_file
  path, _ = _hf_checkpoint(tmp_path, "llama")
  file = path / "model.safetensors"
  tensors = load_file(str(file))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*") as err:
    _load_sharded(path, {"fsdp": 8})
  assert "model.safetensors" in str(err.value)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"up_proj\.weight.*shape \(40, 32\).*config\.json"):
    _load_sharded(path, {"fsdp": 8})
  # A shape that reshapes but is not the config's: the same check as load_hf's.
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 40), np.float32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"up_proj\.weight.*shape \(40, 48\), expected \(32, 48\)"):
    _load_sharded(path, {"fsdp": 8})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_save_loads_in_transformers(family, tmp_path):
  path, hf_model = _hf_checkpoint(tmp_path, family)
  _, _, params, _, _ = _load_sharded(path, {"fsdp": 4, "tensor": 2})
  cfg, _ = models.load_hf(path)
  out = tmp_path / "ours"
  models.save_hf(cfg, params, out, max_file_bytes=30_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (out / "model.safetensors").exists()
  assert files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  sizes = [os.path.getsize(out / f) for f in files]
  assert index["metadata"]["total_size"] <= sum(sizes)
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  rt._assert_clean_load(info)  # pylint: disable=protected-access
  ids, mask = rt._batch()  # pylint: disable=protected-access
  ours = models.logits(cfg, params, ids, mask)
  assert rt._max_diff(rt._hf_logits(reloaded.eval(), ids, mask), ours, mask) < rt.TOL  # pylint: disable=protected-access
  assert rt._max_diff(rt._hf_logits(hf_model, ids, mask), ours, mask) < rt.TOL  # pylint: disable=protected-access
  _assert_equal_trees(params, models.load_hf(out)[1])


def test_two_processes_load_split_and_stream_save(tmp_path):
  """2 processes x 4 devices, fsdp=8: each holds half the params, the save gathers them."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
  import load_memory  # pylint: disable=import-outside-toplevel
  ckpt = str(tmp_path / "ckpt")
  load_memory.make_checkpoint(ckpt, "tiny", max_file_bytes=40_000, num_layers=1)
  results = load_memory.run_workers(ckpt, save=str(tmp_path / "export"),
                                    max_file_bytes=100_000, timeout=240)
  cfg, want = models.load_hf(ckpt)
  total = 4 * models.param_count(want)
  for r in results:  # each process's devices hold about half of the float32 params
    assert r["params"] == models.param_count(want)
    assert 0.4 * total < r["local_bytes"] < 0.6 * total, r
  cfg2, got = models.load_hf(tmp_path / "export")
  assert cfg2 == cfg
  _assert_equal_trees(want, got)
  assert len(json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
             ["weight_map"]) == len(models.hf._entries(cfg, "causal"))  # pylint: disable=protected-access
