"""The second peer: Tunix's `PPOLearner` (JAX / Flax NNX) on the PPO iteration of bench/ppo_iteration.py.

Runs in its own venv (Tunix pins its own jax / flax / transformers):

    python3 -m venv bench/.venv-tunix
    bench/.venv-tunix/bin/pip install google-tunix==0.1.7
    bench/.venv-tunix/bin/python bench/tunix_peer.py --shape tiny --iterations 2

Tunix ships no GPT-2, so the gpt2 shape is a Llama-style model with the same FLOPs per token:
12 layers × 768, 12 heads of 64 (no GQA), tied embeddings, SwiGLU width 2048 (3 × 768 × 2048
= 2 × 768 × 3072, GPT-2's MLP), vocab 50257, RoPE instead of learned positions. `tiny` /
`small` are `rlhf_jax.models.get_preset`'s shapes. Random weights (`nnx.Rngs(0)`), float32.
The value and reward models are the same backbone with a [D, 1] head (no LM head), the
reference a copy of the policy; all five roles (actor, rollout, reference, critic, reward)
share one 1-device mesh, so the rollout reads the actor's weights (no weight sync).

Same rollout batch, prompt / response lengths, PPO epochs and minibatches as the JAX side:
`mini_batch_size = batch / minibatches`, `num_iterations = epochs`, one AdamW step per
minibatch for the policy and for the value model. Tunix's loop differs in one way that is
its design, not a setting: it rolls out, scores and trains ONE MINIBATCH AT A TIME (each of
the `minibatches` steps samples `batch / minibatches` prompts, scores them, then updates),
so its generation runs at batch `batch / minibatches`; the work per iteration (B rollouts,
B scored, `minibatches` updates per model) is the same. No EOS: the rollout's stop id is
-1 (never sampled), so every response is `new_tokens` long; the tokenizer's EOS id V-1 is
what Tunix's masks read (a random-weight model samples it with probability ~1/V).
Prompts are random ids in [1, V-2] passed as text ("17 4 ...") through a whitespace
tokenizer with no BOS, so every prompt is exactly `prompt_len` tokens.

Phase timers (wall time, summed over the minibatch steps of one iteration): generate =
`RLCluster.generate`; score = the rest of `PPOLearner._generate_and_compute_advantage`
(reference and old log-probs, values, reward, GAE; its result is blocked on); train =
`update_actor` + `update_critic`, each blocked on the model's state. An iteration is one
`_run_global_step`; the first (compiles) is dropped. Prints `RESULT {json}` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Only the standard library from the harness's shared module (this venv has no rlhf_jax).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (layers, hidden, heads, kv_heads, head_dim, mlp width, vocab)
SHAPES = {
    "gpt2": (12, 768, 12, 12, 64, 2048, 50257),
    "gpt2-small": (12, 768, 12, 12, 64, 2048, 50257),
    "tiny": (2, 64, 4, 2, 16, 128, 256),
    "small": (4, 64, 4, 2, 16, 128, 256),
    # Llama-3.2-1B dims, as rlhf_jax's preset (Tunix runs it in float32, ours in bf16 on GPU).
    "llama-1b": (16, 2048, 32, 8, 64, 8192, 128256),
}


class IdTokenizer:
  """Text "17 4 9" <-> ids [17, 4, 9]; pad 0, EOS V-1, no BOS (Tunix's duck-typed API)."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text, **kw):
    # With one minibatch (mini_batch_size = batch) Tunix hands each prompt over as a [1]
    # array of str, not a str.
    if not isinstance(text, str) and getattr(text, "size", 0) == 1:
      text = str(text.reshape(-1)[0])
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self):
    return self.vocab_size - 1

  def pad_id(self):
    return 0


def make_models(shape: str, nnx, llama3):
  """(policy, reference, critic, reward) nnx modules; critic / reward = backbone + [D, 1]."""
  layers, d, heads, kv, hd, f, vocab = SHAPES[shape]
  cfg = llama3.ModelConfig(num_layers=layers, vocab_size=vocab, embed_dim=d, hidden_dim=f,
                           num_heads=heads, head_dim=hd, num_kv_heads=kv,
                           rope_theta=500_000 if shape == "llama-1b" else 10_000,
                           norm_eps=1e-6, weight_tying=True)

  class ScoreModel(nnx.Module):
    """A Llama3 backbone read by a linear [D, 1] head at every position ([B, T, 1]), the
    call signature `tunix.rl.common.compute_score` uses; the LM head never runs."""

    def __init__(self, rngs):
      self.backbone = llama3.Llama3(cfg, rngs=rngs)
      self.score = nnx.Linear(d, 1, use_bias=False, rngs=rngs)

    def __call__(self, input_tokens, positions, cache, attention_mask, **kw):
      x = self.backbone.embedder.encode(input_tokens)
      for layer in self.backbone.layers:
        _, x = layer(x, positions, None, attention_mask)
      return self.score(self.backbone.final_norm(x))

  policy = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
  reference = nnx.clone(policy)
  reward = ScoreModel(nnx.Rngs(1))
  critic = nnx.clone(reward)
  return cfg, policy, reference, critic, reward


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  common.add_ppo_shape_args(ap)
  ap.add_argument("--threads", type=int, default=0, help="unused (the TRL peer's flag)")
  args = ap.parse_args(argv)
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  if B % args.minibatches:
    raise SystemExit(f"tunix_peer: --batch {B} is not a multiple of --minibatches "
                     f"{args.minibatches}")

  import jax
  import numpy as np
  import optax
  from flax import nnx
  from tunix.models.llama3 import model as llama3
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.ppo import ppo_learner
  from tunix.rl.rollout import base_rollout

  cfg, policy, reference, critic, reward = make_models(args.shape, nnx, llama3)
  tok = IdTokenizer(cfg.vocab_size)
  n_iter = args.iterations + 1
  mb = B // args.minibatches
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  roles = rl_cluster_lib.Role
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(1e-5), critic_optimizer=optax.adamw(1e-5),
      mini_batch_size=mb, eval_every_n_steps=10**9,
      max_steps=n_iter * args.minibatches * args.epochs,
      checkpoint_root_directory=None, metrics_logging_options=None)
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N, temperature=1.0,
      top_p=1.0, top_k=None, eos_tokens=[-1], seed=0)
  cluster = rl_cluster_lib.RLCluster(
      actor=policy, critic=critic, reference=reference, reward=reward, tokenizer=tok,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={r: mesh for r in (roles.ACTOR, roles.CRITIC, roles.REFERENCE,
                                          roles.REWARD, roles.ROLLOUT)},
          rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
          rollout_config=rollout))
  learner = ppo_learner.PPOLearner(
      rl_cluster=cluster,
      ppo_config=ppo_learner.PPOConfig(num_iterations=args.epochs, beta=0.02, gamma=1.0,
                                       gae_lambda=0.95, epsilon=0.2, entropy_coef=None))

  # Phase timers: wrap the cluster's / learner's own methods (same objects the loop calls).
  phase = dict(generate=0.0, score=0.0, train=0.0)
  iters = []

  def wrap(obj, name, fn):
    setattr(obj, name, fn(getattr(obj, name)))

  def timed_generate(orig):
    def f(*a, **kw):
      t0 = time.perf_counter()
      out = orig(*a, **kw)
      phase["generate"] += time.perf_counter() - t0
      return out
    return f

  def timed_advantage(orig):
    def f(*a, **kw):
      g0, t0 = phase["generate"], time.perf_counter()
      out = jax.block_until_ready(orig(*a, **kw))
      phase["score"] += time.perf_counter() - t0 - (phase["generate"] - g0)
      return out
    return f

  def timed_update(orig, model_of):
    def f(*a, **kw):
      t0 = time.perf_counter()
      out = orig(*a, **kw)
      jax.block_until_ready(nnx.state(model_of()))
      phase["train"] += time.perf_counter() - t0
      return out
    return f

  def timed_step(orig):
    def f(*a, **kw):
      for k in phase:
        phase[k] = 0.0
      t0 = time.perf_counter()
      out = orig(*a, **kw)
      iters.append(dict(total=time.perf_counter() - t0, **phase))
      print(f"# tunix iteration {len(iters)}: " + ", ".join(
          f"{k} {v:.2f} s" for k, v in iters[-1].items()), flush=True)
      return out
    return f

  wrap(cluster, "generate", timed_generate)
  wrap(learner, "_generate_and_compute_advantage", timed_advantage)
  wrap(cluster, "update_actor",
       lambda o: timed_update(o, lambda: cluster.actor_trainer.model))
  wrap(cluster, "update_critic",
       lambda o: timed_update(o, lambda: cluster.critic_trainer.model))
  wrap(learner, "_run_global_step", timed_step)

  rs = np.random.RandomState(0)
  ids = rs.randint(1, cfg.vocab_size - 1, size=(n_iter, B, P))
  dataset = [{"prompts": [" ".join(map(str, row)) for row in batch]} for batch in ids]
  learner.train(dataset)
  if len(iters) != n_iter:
    raise SystemExit(f"tunix_peer: expected {n_iter} iterations, saw {len(iters)}")
  timed = iters[1:]
  med = {k: statistics.median(r[k] for r in timed) for k in ("total", "generate", "score",
                                                              "train")}
  import flax
  import tunix
  version = getattr(tunix, "__version__", None)
  if version is None:
    from importlib import metadata
    version = metadata.version("google-tunix")
  result = dict(shape=args.shape, batch=B, prompt_len=P, new_tokens=N, minibatch=mb,
                threads=os.cpu_count(), warmup_s=iters[0]["total"],
                times=[r["total"] for r in timed], iter_s=med["total"],
                episodes_s=B / med["total"], generate_s=med["generate"],
                score_s=med["score"], train_s=med["train"],
                optimizer_steps=int(cluster.actor_trainer.train_steps),
                versions=f"tunix {version} (its jax {jax.__version__}, flax {flax.__version__})")
  print("RESULT " + json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
