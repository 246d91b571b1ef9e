"""LoRA (rlhf_jax/models/lora.py) and its use by the SFT and PPO trainers.

References: closed-form parameter counts (Σ over targeted kernels of r·(in + out)); a
float64 numpy merge W + (alpha / r)·A·B written from Hu et al. 2021 eq. 3 in the HF weight
layout; a float64 PyTorch forward/backward of transformers' own model with the merged
weights for one SFT step; transformers' logits of the merged export; PEFT (when installed:
a test-only dependency) loading the adapter alone onto the base; and the 1-device run of a
LoRA PPO update for the 4-device one.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import models, optim, sharding
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import lora
from rlhf_jax.trainers import model_init, ppo, sft

from helpers import copy_rows, run_launcher, tiny_hf_llama, write_jsonl

CFG = models.get_preset("tiny").replace(vocab_size=64, eos_token_id=1, pad_token_id=0)
RULES = dict(sharding.DEFAULT_RULES)
LR = 1e-3


def _optim_cfg():
  return ml_collections.ConfigDict(dict(
      lr=LR, warmup_steps=0, schedule="constant", final_lr_frac=1.0, weight_decay=0.0,
      b1=0.9, b2=0.95, eps=1e-6, grad_clip=0.0))


def _lora_cfg(rank=4, alpha=8.0, targets="q_proj,v_proj"):
  return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, targets=targets,
                                        export_adapter=True))


def _mesh(n):
  if n == 1:
    return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  return sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])


def _random_b(trainable, seed):
  """Adapters with B != 0 (a trained state), so the merged model differs from the base."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)
      if p[-1].key == "b" else x, trainable)


# ------------------------------------------------------------------- counts and merge

def _closed_form(cfg, r, names):
  d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)
  io = dict(q_proj=(d, n * h), k_proj=(d, k * h), v_proj=(d, k * h), o_proj=(n * h, d),
            gate_proj=(d, f), up_proj=(d, f), down_proj=(f, d))
  return cfg.num_layers * sum(r * (io[x][0] + io[x][1]) for x in names)


@pytest.mark.parametrize("targets,names", [
    ("", ("q_proj", "v_proj")),
    ("q_proj,k_proj,o_proj,down_proj", ("q_proj", "k_proj", "o_proj", "down_proj")),
    ("all", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))])
def test_trained_params_and_adam_bytes_are_what_the_rank_implies(targets, names):
  c = config_lib.sft_config()
  c.optim, c.model.lora = _optim_cfg(), _lora_cfg(rank=3, targets=targets)
  c.train.batch_size = 4
  mesh = _mesh(1)
  model = model_init.place(mesh, RULES, CFG, "causal",
                           jax.device_get(models.init(CFG, jax.random.PRNGKey(0))))
  parts = sft.build(c, mesh, model, total_steps=5)
  state = jax.eval_shape(parts.init_state)
  want = _closed_form(CFG, 3, names)
  assert models.param_count(state["params"]) == want == lora.count(CFG, parts.lora)
  assert set(state["params"]) == {"adapters"}
  floats = [x for x in jax.tree.leaves(state["opt_state"])
            if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0]
  # Adam: one first and one second moment per trained param, float32; nothing for the base.
  assert sum(x.size * x.dtype.itemsize for x in floats) == 2 * 4 * want


def test_step_zero_is_the_base_and_the_merge_is_w_plus_scaled_ab():
  base = models.init(CFG, jax.random.PRNGKey(0))
  spec = lora.Spec(4, 8.0, ("all",))
  trainable = lora.init_trainable(CFG, base, spec, jax.random.PRNGKey(1))
  ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (2, 7)), jnp.int32)
  mask = jnp.ones_like(ids)
  np.testing.assert_array_equal(
      models.logits(CFG, lora.full_params(CFG, base, trainable, spec), ids, mask),
      models.logits(CFG, base, ids, mask))
  # A trained state against float64 numpy in the HF layout: W_hf [out, in] + s · B_hf A_hf.
  trainable = _random_b(trainable, 0)
  merged = jax.device_get(lora.full_params(CFG, base, trainable, spec))
  ours = jax.device_get(trainable["adapters"])
  s = 8.0 / 4
  for i in range(CFG.num_layers):
    for group, name, module in (("self_attn", "k_proj", ("attn", "k")),
                                ("self_attn", "o_proj", ("attn", "o")),
                                ("mlp", "down_proj", ("mlp", "down"))):
      a = np.asarray(ours[f"layer_{i}"][group][name]["a"], np.float64)
      b = np.asarray(ours[f"layer_{i}"][group][name]["b"], np.float64)
      r = a.shape[-1]
      a_hf, b_hf = a.reshape(-1, r).T, b.reshape(r, -1).T          # [r, in], [out, r]
      w = np.asarray(jax.device_get(base)["backbone"][f"layer_{i}"][module[0]][module[1]]
                     ["kernel"], np.float64)
      n_in = 2 if name == "o_proj" else 1
      w_hf = w.reshape(int(np.prod(w.shape[:n_in])), -1).T
      got = np.asarray(merged["backbone"][f"layer_{i}"][module[0]][module[1]]["kernel"])
      want = (w_hf + s * b_hf @ a_hf).T.reshape(w.shape)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bad_targets_name_the_field_and_the_valid_names():
  c = config_lib.sft_config()
  c.model.lora.targets = "q_proj,qkv"
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert "model.lora.targets" in str(e.value) and "down_proj" in str(e.value)
  gpt2 = models.get_preset("tiny").replace(family="gpt2")
  with pytest.raises(ConfigError) as e:   # a Llama name on GPT-2: the family's names
    lora.sites(gpt2, lora.Spec(2, 4.0, ("q_proj",)))
  assert "c_attn" in str(e.value)
  c = config_lib.rm_config()
  c.model.lora.rank = 2
  with pytest.raises(ConfigError, match="model.lora.rank"):
    config_lib.validate(c)
  c = config_lib.ppo_config()
  c.model.lora.rank, c.ppo.ema_decay = 2, 0.9
  with pytest.raises(ConfigError, match="ppo.ema_decay"):
    config_lib.validate(c)


# ------------------------------------------------------ one SFT step against float64 torch

def _sft_batch():
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 16, (4, 10)).astype(np.int32)
  mask = (np.arange(10)[None] < np.array([10, 8, 9, 6])[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  loss_mask = ((np.arange(10)[None] >= 3) & (mask > 0)).astype(np.int32)
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)


def _torch_loss_and_grads(hf_dir, tensors, scale, batch):
  """float64 transformers forward with W + s·B·A; returns (loss, {peft name: grad})."""
  torch = pytest.importorskip("torch")
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
  leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for k, v in tensors.items()}
  weights = dict(model.named_parameters())
  for key in leaves:
    if key.endswith(".lora_A.weight"):
      module = key[len("base_model.model."):-len(".lora_A.weight")]
      b = leaves[key.replace("lora_A", "lora_B")]
      weights[module + ".weight"] = weights[module + ".weight"] + scale * b @ leaves[key]
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  am = torch.tensor(batch["attention_mask"])
  logits = torch.func.functional_call(model, weights, (ids,), dict(attention_mask=am)).logits
  logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
  m = torch.tensor(batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:],
                   dtype=torch.float64)
  loss = -(logp * m).sum() / m.sum()
  loss.backward()
  return float(loss), {k: v.grad.numpy() for k, v in leaves.items()}


def test_an_sft_step_trains_only_adapters_and_matches_float64_torch(tmp_path):
  hf_dir = tiny_hf_llama(str(tmp_path / "base"))
  cfg, host = models.load_hf(hf_dir)
  c = config_lib.sft_config()
  c.optim, c.model.lora = _optim_cfg(), _lora_cfg(rank=2, alpha=6.0, targets="all")
  c.train.batch_size, c.train.grad_accum = 4, 2
  mesh = _mesh(1)
  model = model_init.place(mesh, RULES, cfg, "causal", host)
  parts = sft.build(c, mesh, model, total_steps=5)
  state = parts.init_state()
  state["params"] = _random_b(state["params"], 1)
  start = jax.device_get(state["params"])
  tensors = lora.peft_tensors(cfg, start["adapters"], parts.lora)
  want_loss, grads = _torch_loss_and_grads(hf_dir, tensors, 3.0, _sft_batch())

  new, metrics = sft.step(parts, state, _sft_batch())
  np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
  # Torch's gradients, mapped back to our layout, through the same optimiser.
  want_grads = jax.tree.map(np.zeros_like, start)
  for i in range(cfg.num_layers):
    for group, name, _, _ in lora.sites(cfg, parts.lora):
      ad = want_grads["adapters"][f"layer_{i}"][group][name]
      key = f"base_model.model.model.layers.{i}.{group}.{name}"
      ad["a"] = grads[key + ".lora_A.weight"].T.reshape(ad["a"].shape).astype(np.float32)
      ad["b"] = grads[key + ".lora_B.weight"].T.reshape(ad["b"].shape).astype(np.float32)
  g_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                       for g in jax.tree.leaves(want_grads)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), g_norm, rtol=1e-4)
  tx = optim.make_optimizer(c.optim, 5)
  updates, _ = tx.update(want_grads, tx.init(start), start)
  want = optax.apply_updates(start, updates)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, atol=LR * 1e-2),
               jax.device_get(new["params"]), want)
  # The base is untouched: the model's arrays are not in the state and were not donated.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params), host)


# ----------------------------------------------------------------------- the exports

def _hf_logits(path, ids, mask, peft_adapter=None):
  torch = pytest.importorskip("torch")
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  if peft_adapter is not None:
    peft = pytest.importorskip("peft", reason="peft is a test-only reference")
    model = peft.PeftModel.from_pretrained(model, peft_adapter).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask)).logits.numpy()


def _gpt2_dir(out_dir):
  torch = pytest.importorskip("torch")
  import transformers
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=2, n_head=4)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(out_dir)
  return out_dir


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_and_peft_adapter_give_our_logits(tmp_path, family):
  base_dir = tiny_hf_llama(str(tmp_path / "base")) if family == "llama" else \
      _gpt2_dir(str(tmp_path / "base"))
  cfg, base = models.load_hf(base_dir)
  spec = lora.Spec(3, 5.0, ("all",))
  trainable = _random_b(lora.init_trainable(cfg, base, spec, jax.random.PRNGKey(2)), 2)
  merged = jax.device_get(lora.full_params(cfg, base, trainable, spec))
  workdir = str(tmp_path / "run")
  out = workdir_lib.export(workdir, cfg, merged, None, "causal")
  adapter = workdir_lib.export_adapter(workdir, cfg, trainable["adapters"], spec, base_dir)
  ids = np.random.default_rng(0).integers(3, 16, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  ours = np.asarray(models.logits(cfg, merged, ids, mask))
  np.testing.assert_allclose(_hf_logits(out, ids, mask), ours, atol=2e-4)

  # The PEFT files: names and shapes from the PEFT docs (lora_A [r, in], lora_B [out, r]).
  from safetensors.numpy import load_file
  config = json.load(open(os.path.join(adapter, "adapter_config.json")))
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 3, 5.0)
  assert config["base_model_name_or_path"] == os.path.abspath(base_dir)
  tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
  d = cfg.hidden_size
  if family == "llama":
    assert config["fan_in_fan_out"] is False
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    assert tensors[q + ".lora_A.weight"].shape == (3, d)
    assert tensors[q + ".lora_B.weight"].shape == (cfg.num_heads * cfg.head_dim, 3)
    assert tensors[o + ".lora_A.weight"].shape == (3, cfg.num_heads * cfg.head_dim)
    assert len(tensors) == 2 * 7 * cfg.num_layers
  else:
    assert config["fan_in_fan_out"] is True
    qkv = "base_model.model.transformer.h.0.attn.c_attn"
    assert tensors[qkv + ".lora_B.weight"].shape == (3 * d, 3)
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight" in tensors
    assert len(tensors) == 2 * 4 * cfg.num_layers
  # PEFT itself, on the untouched base: the adapter alone reproduces our merged model.
  np.testing.assert_allclose(_hf_logits(base_dir, ids, mask, peft_adapter=adapter), ours,
                             atol=2e-4)


# -------------------------------------------------- a LoRA PPO update on 4 devices vs 1

def _ppo_run(n_devices):
  from test_scale_out import (B_PPO, EOS, P_PPO, PAD, POLICY0, PPO_PROMPTS, PTX_BATCH,
                              REWARD0, SCALAR0, _ppo_cfg)
  from test_scale_out import CFG as SCALE_CFG
  mesh = _mesh(n_devices)
  c = config_lib.ppo_config()
  c.optim, c.model.lora = _optim_cfg(), _lora_cfg(rank=2, targets="q_proj,o_proj,up_proj")
  c.train.batch_size, c.ppo = B_PPO, _ppo_cfg()
  # One epoch of one minibatch: the update's first (only) ratio is π_merged / π_merged = 1
  # when the update merges the adapters exactly as the rollout's experience did.
  c.ppo.epochs, c.ppo.minibatches = 1, 1
  place = lambda kind, p: model_init.place(mesh, RULES, SCALE_CFG, kind, p)  # noqa: E731
  ms = ppo.Models(policy=place("causal", POLICY0), value=place("scalar", SCALAR0),
                  reward=place("scalar", REWARD0), normalization=dict(mean=0.1, std=1.0,
                                                                      gain=False),
                  eos_id=EOS, pad_id=PAD, stop_ids=(EOS,))
  parts = ppo.build(c, mesh, ms, use_ptx=True)
  st = parts.init_state()
  st["policy"] = _random_b(st["policy"], 3)
  start = jax.device_get(st["policy"])
  exp_fn, update_fn = parts.fns(P_PPO)
  batch = sharding.host_to_global(mesh, PPO_PROMPTS)
  exp, exp_metrics = exp_fn(parts.policy_params(st["policy"]), parts.models.policy.params,
                            parts.value_params(st["value"]), parts.models.reward.params,
                            st["kl_ctl"]["kl_coef"], batch["input_ids"],
                            batch["attention_mask"], batch["tokens"], batch["response_mask"])
  new, metrics = update_fn(st, exp, sharding.host_to_global(mesh, PTX_BATCH),
                           jax.random.PRNGKey(7), parts.frozen())
  host = lambda t: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), t)  # noqa: E731
  return parts, host(new), host(dict(exp_metrics, **metrics)), host(exp), start


def test_a_lora_ppo_update_on_4_devices_equals_1_device():
  parts1, new1, m1, exp1, start = _ppo_run(1)
  parts4, new4, m4, exp4, _ = _ppo_run(4)
  # The state: adapters (+ the value head) and their Adam moments, no base weights.
  assert set(new1["policy"]) == {"adapters"} and set(new1["value"]) == {"adapters", "head"}
  assert models.param_count(new1["policy"]) == lora.count(parts1.models.policy.cfg,
                                                          parts1.lora)
  # The reference IS the frozen base the policy adapts: the same arrays, no second copy.
  assert parts4.frozen()[0] is parts4.models.policy.params
  # Sharding only reorders float32 sums (a few ulps; the merged kernels here add a
  # tensordot over the rank and a second model through the same reordered reductions, seen
  # 2e-6 on a value of 0.009); a wrong collective is off by O(value) or O(lr).
  for got, want in ((m4, m1), (exp4, exp1)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got,
                 want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-2 * LR), new4, new1)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       new1["policy"]["adapters"]["layer_0"]["self_attn"]["q_proj"],
                       start["adapters"]["layer_0"]["self_attn"]["q_proj"])
  assert moved["a"] > 0 and moved["b"] > 0
  assert abs(m1["approx_kl"]) < 1e-6 and m1["policy_clip_frac"] == 0


# --------------------------------------------------------------- the launcher, end to end

def test_launcher_sft_with_lora_on_user_data(tmp_path):
  base = tiny_hf_llama(str(tmp_path / "base"))
  train = write_jsonl(str(tmp_path / "train.jsonl"), copy_rows(32))
  workdir = str(tmp_path / "run")
  proc = run_launcher("configs/sft.py:tiny", workdir, "--config.task=",
                      f"--config.model.init_from={base}", f"--config.data.train.path={train}",
                      "--config.model.lora.rank=4", "--config.model.lora.targets=all",
                      "--config.train.batch_size=8", "--config.train.steps=3",
                      "--config.data.max_len=32", "--config.data.max_prompt_len=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LoRA rank 4" in proc.stderr
  cfg, exported = models.load_hf(os.path.join(workdir, "export", "policy"))
  _, start = models.load_hf(base)
  adapter = os.path.join(workdir, "export", "adapter")
  assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
  # Only targeted kernels moved; norms, embeddings and the head are the base's.
  np.testing.assert_array_equal(exported["lm_head"]["kernel"], start["lm_head"]["kernel"])
  np.testing.assert_array_equal(exported["backbone"]["embed"]["embedding"],
                                start["backbone"]["embed"]["embedding"])
  assert not np.array_equal(exported["backbone"]["layer_0"]["mlp"]["down"]["kernel"],
                            start["backbone"]["layer_0"]["mlp"]["down"]["kernel"])


@pytest.mark.parametrize("stage", ["rm", "grpo", "dpo"])
def test_stages_that_train_the_full_model_refuse_lora(stage):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{stage}.py")
  spec = importlib.util.spec_from_file_location(f"lora_refused_{stage}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.model.lora.rank = 4
  with pytest.raises(ConfigError, match="model.lora.rank"):
    config_lib.validate(c)
