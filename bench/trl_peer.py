"""The peer: TRL 0.19's `PPOTrainer` (PyTorch) on the same PPO iteration as bench/ppo_iteration.py.

Runs in its own venv (TRL 0.19 pins transformers / accelerate versions of its own):

    python3 -m venv bench/.venv-trl
    bench/.venv-trl/bin/pip install torch==2.13.0 'trl==0.19.*'
    bench/.venv-trl/bin/python bench/trl_peer.py --shape tiny --iterations 2

Same shape (random weights from `from_config`), rollout batch, prompt / response lengths,
PPO epochs and minibatches as the JAX side: `per_device_train_batch_size = batch`,
`gradient_accumulation_steps = 1`, `num_mini_batches = minibatches` gives `minibatches`
optimiser steps of `batch / minibatches` episodes per epoch, as `ppo.make_update_fn` does.
No stop token (every response is `new_tokens` long), float32, dropout off (TRL disables it),
no sample generations, no checkpoints. An iteration's time is the wall time between two
consecutive `on_step_end` callbacks (TRL calls it once per rollout + update); the first
iteration (warm-up) is dropped. Generation time is measured by wrapping TRL's
`batch_generation`. Prints one line `RESULT {json}` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# Only the standard library and numpy from the harness's shared module (this venv has no jax).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def hf_configs(shape: str, transformers):
  if shape in ("gpt2", "gpt2-small"):
    cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                  n_positions=1024, pad_token_id=0, bos_token_id=None,
                                  eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
  elif shape in ("tiny", "small"):   # rlhf_jax.models.get_preset: 2 / 4 layers, else equal
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64,
                                   num_hidden_layers=2 if shape == "tiny" else 4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   intermediate_size=128, max_position_embeddings=512,
                                   rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=None,
                                   eos_token_id=None)
  else:
    raise SystemExit(f"trl_peer: unknown shape {shape!r}")
  return cfg


def make_tokenizer(vocab_size: int, transformers):
  """A word-level fast tokenizer over ids 0..V-1 (only its pad / eos ids are used)."""
  import tokenizers
  vocab = {f"t{i}": i for i in range(vocab_size)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0",
                                              eos_token=f"t{vocab_size - 1}", unk_token="t1")
  fast.padding_side = "left"
  return fast


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="tiny")
  common.add_ppo_shape_args(ap)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  args = ap.parse_args(argv)

  import numpy as np
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from trl.trainer import ppo_trainer as ppo_mod

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  cfg = hf_configs(args.shape, transformers)
  policy = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  ref.load_state_dict(policy.state_dict())
  base = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
  scfg = cfg.__class__(**{**base, "num_labels": 1})
  reward = transformers.AutoModelForSequenceClassification.from_config(scfg, dtype=torch.float32)
  value = transformers.AutoModelForSequenceClassification.from_config(scfg, dtype=torch.float32)
  value.load_state_dict(reward.state_dict())
  tok = make_tokenizer(cfg.vocab_size, transformers)

  B, P, N = args.batch, args.prompt_len, args.new_tokens
  n_iter = args.iterations + 1
  rs = np.random.RandomState(0)
  ids = rs.randint(1, cfg.vocab_size - 1, size=(B * n_iter, P)).tolist()
  dataset = Dataset.from_dict({"input_ids": ids})

  gen_times = []
  orig_generation = ppo_mod.batch_generation

  def timed_generation(*a, **kw):
    t0 = time.perf_counter()
    out = orig_generation(*a, **kw)
    gen_times.append(time.perf_counter() - t0)
    return out

  ppo_mod.batch_generation = timed_generation
  marks = []

  class Timer(transformers.TrainerCallback):
    def on_step_end(self, args_, state, control, **kw):
      marks.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as out_dir:
    config = trl.PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=B, gradient_accumulation_steps=1,
        num_mini_batches=args.minibatches, num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=B, response_length=N, total_episodes=B * n_iter,
        stop_token=None, missing_eos_penalty=None, num_sample_generations=0,
        temperature=1.0, kl_coef=0.02, learning_rate=1e-5, seed=0, bf16=False, fp16=False,
        use_cpu=True, logging_steps=1000, dataloader_num_workers=0)
    trainer = trl.PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=dataset,
                             eval_dataset=dataset, callbacks=[Timer()])
    t_start = time.perf_counter()
    trainer.train()
  if len(marks) != n_iter:
    raise SystemExit(f"trl_peer: expected {n_iter} iterations, saw {len(marks)}")
  times = [b - a for a, b in zip([t_start] + marks[:-1], marks)]
  timed = times[1:]
  iter_s = statistics.median(timed)
  gen_s = statistics.median(gen_times[1:]) if len(gen_times) > 1 else float("nan")
  import accelerate
  result = dict(shape=args.shape, batch=B, prompt_len=P, new_tokens=N, threads=args.threads,
                warmup_s=times[0], times=timed, iter_s=iter_s, episodes_s=B / iter_s,
                generate_s=gen_s,
                versions=(f"trl {trl.__version__}, torch {torch.__version__}, transformers "
                          f"{transformers.__version__}, accelerate {accelerate.__version__}"))
  print("RESULT " + json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
