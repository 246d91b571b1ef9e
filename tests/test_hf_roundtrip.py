"""HF interop against transformers' PyTorch models (the independent reference).

For each family: random tiny HF model -> save_pretrained -> models.load_hf -> logits match
transformers on a left-padded batch; models.save_hf -> transformers reloads cleanly -> match
again. Plus sharded checkpoints, 4.x- vs 5.x-style configs, scalar (sequence
classification) models and clear errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the transformers reference; install the test extra")
transformers = pytest.importorskip("transformers")

from rlhf_jax import models  # pylint: disable=wrong-import-position

VOCAB = 100
TOL = 1e-4


def _hf_config(family: str):
  common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rms_norm_eps=1e-5, **common)
  if family == "gpt2":
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
  if family == "llama":
    return transformers.LlamaConfig(rope_theta=500.0, **llama_like)
  if family == "llama3_scaling":
    # head_dim 8 at theta 1e4 has wavelengths 6.3, 63, 628, 6283: with the band [4, 32]
    # that is one unscaled, one smoothed and two scaled frequencies.
    return transformers.LlamaConfig(
        rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                                          "original_max_position_embeddings": 32},
        **llama_like)
  if family == "qwen2":
    return transformers.Qwen2Config(tie_word_embeddings=True, rope_theta=1000.0, **llama_like)
  if family == "mistral":
    return transformers.MistralConfig(sliding_window=4, **llama_like)
  if family == "gpt_neox":
    return transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64,
                                      rotary_pct=0.25, rotary_emb_base=1000,
                                      use_parallel_residual=True, **common)
  raise ValueError(family)


def _randomise(model):
  """HF init leaves biases 0 and norms 1; randomise everything so every mapping is tested."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.1
      p.copy_((1.0 + noise) if ("norm" in name or "ln_" in name) and name.endswith("weight")
              else noise)
  return model


def _hf_model(family: str, cls=None, **overrides):
  torch.manual_seed(0)
  cfg = _hf_config(family)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  cls = cls or transformers.AutoModelForCausalLM
  model = cls.from_config(cfg, attn_implementation="eager")
  return _randomise(model).eval()


def _batch(t: int = 10):
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, size=(3, t))
  mask = np.ones((3, t), np.int64)
  mask[1, :3] = 0
  mask[2, :6] = 0
  ids = np.where(mask == 1, ids, 0)
  return ids, mask


def _hf_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def _max_diff(a, b, mask):
  m = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(a)[m] - np.asarray(b)[m])))


def _assert_clean_load(info):
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info[key], f"{key}: {info[key]}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3_scaling", "qwen2", "mistral",
                                    "gpt_neox"])
def test_causal_roundtrip(family, tmp_path):
  hf_model = _hf_model(family)
  hf_model.save_pretrained(tmp_path / "hf")
  ids, mask = _batch()
  want = _hf_logits(hf_model, ids, mask)

  cfg, params = models.load_hf(tmp_path / "hf")
  assert models.api.kind_of(params) == "causal"
  got = models.logits(cfg, params, ids, mask)
  assert got.shape == want.shape
  assert _max_diff(got, want, mask) < TOL

  models.save_hf(cfg, params, tmp_path / "ours")
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "ours", output_loading_info=True, attn_implementation="eager")
  _assert_clean_load(info)
  assert type(reloaded).__name__ == type(hf_model).__name__
  assert _max_diff(_hf_logits(reloaded.eval(), ids, mask), got, mask) < TOL
  # Our sidecar gives back the identical config.
  cfg2, params2 = models.load_hf(tmp_path / "ours")
  assert cfg2 == cfg
  assert models.param_count(params2) == models.param_count(params)


def test_sharded_checkpoint(tmp_path):
  hf_model = _hf_model("llama")
  hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert not (tmp_path / "model.safetensors").exists()
  ids, mask = _batch()
  cfg, params = models.load_hf(tmp_path)
  assert _max_diff(models.logits(cfg, params, ids, mask), _hf_logits(hf_model, ids, mask),
                   mask) < TOL


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_v4_and_v5_config_layouts(family, tmp_path):
  """transformers 4.x wrote rope fields at top level; 5.x nests them in rope_parameters."""
  hf_model = _hf_model(family)
  hf_model.save_pretrained(tmp_path)
  cfg_file = tmp_path / "config.json"
  v5 = json.loads(cfg_file.read_text())
  cfg5, params = models.load_hf(tmp_path)
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "rope_scaling")}
  theta = (v5.get("rope_parameters") or {}).get("rope_theta", v5.get("rope_theta"))
  if family == "gpt_neox":
    v4["rotary_emb_base"] = theta
    v4["rotary_pct"] = 0.25
  else:
    v4["rope_theta"] = theta
  cfg_file.write_text(json.dumps(v4))
  cfg4, _ = models.load_hf(tmp_path)
  assert cfg4 == cfg5
  assert cfg5.rope_theta == (1000.0 if family == "gpt_neox" else 500.0)
  assert cfg5.rotary_pct == (0.25 if family == "gpt_neox" else 1.0)
  ids, mask = _batch()
  assert _max_diff(models.logits(cfg4, params, ids, mask), _hf_logits(hf_model, ids, mask),
                   mask) < TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scalar_roundtrip(family, tmp_path):
  cls = transformers.AutoModelForSequenceClassification
  hf_model = _hf_model(family, cls=cls, num_labels=1)
  hf_model.save_pretrained(tmp_path / "hf")
  ids, mask = _batch()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)))
  want = want.logits[:, 0].numpy()  # HF reads the last non-pad token: index T-1 (left padding)
  cfg, params = models.load_hf(tmp_path / "hf")
  assert models.api.kind_of(params) == "scalar"
  last = np.full((ids.shape[0],), ids.shape[1] - 1)
  got = np.asarray(models.scores(cfg, params, ids, mask, last))
  np.testing.assert_allclose(got, want, atol=TOL)

  models.save_hf(cfg, params, tmp_path / "ours")
  reloaded, info = cls.from_pretrained(tmp_path / "ours", output_loading_info=True,
                                       attn_implementation="eager")
  _assert_clean_load(info)
  assert reloaded.config.num_labels == 1
  with torch.no_grad():
    again = reloaded.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)))
  np.testing.assert_allclose(again.logits[:, 0].numpy(), got, atol=TOL)


def test_scalar_bias_kept_in_sidecar(tmp_path):
  cfg = models.get_preset("tiny").replace(eos_token_id=2)
  params = models.causal_to_scalar(cfg, models.init(cfg, 0), 1)
  params["head"]["bias"] = params["head"]["bias"] + 0.5
  with pytest.warns(UserWarning, match="bias"):
    models.save_hf(cfg, params, tmp_path)
  cfg2, params2 = models.load_hf(tmp_path)
  assert cfg2 == cfg
  assert float(params2["head"]["bias"][0]) == pytest.approx(0.5)
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"]
  # No pad id and no spare embedding row: save_hf appends one for a pad id that is not EOS
  # (tests/test_rm_export_index.py checks what transformers then reads).
  assert hf_cfg["pad_token_id"] == 256 and hf_cfg["vocab_size"] == 257


def test_unknown_architecture_is_clear(tmp_path):
  _hf_model("llama").save_pretrained(tmp_path)
  cfg_file = tmp_path / "config.json"
  hf = json.loads(cfg_file.read_text())
  hf["architectures"] = ["FancyNetForCausalLM"]
  cfg_file.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="FancyNetForCausalLM") as err:
    models.load_hf(tmp_path)
  assert "config.json" in str(err.value)


def test_missing_tensor_is_clear(tmp_path):
  from safetensors.numpy import load_file, save_file
  _hf_model("llama").save_pretrained(tmp_path)
  file = tmp_path / "model.safetensors"
  tensors = load_file(str(file))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
    models.load_hf(tmp_path)
  assert "model.safetensors" in str(err.value)


def test_missing_directory_is_clear(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    models.load_hf(tmp_path / "nope")
