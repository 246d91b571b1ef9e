"""One full PPO iteration (rollout, experience, update): episodes/s, time split and MFU per phase.

Runs the trainer's own parts (`trainers.ppo.build`, then `trainers.ppo.iteration`) with
random weights on a 1-device mesh: rollout with `sampling.generate`, experience (policy /
reference log-probs, values, reward-model scores, KL-penalised rewards, GAE), and
`ppo.epochs` × `ppo.minibatches` updates (+ the KL-controller step), each jitted with the
state's shardings and donation.

    python bench/ppo_iteration.py --shape tiny --iterations 3
    python bench/ppo_iteration.py --shape gpt2 --iterations 1 --trl    # + TRL's PPOTrainer
    python bench/ppo_iteration.py --shape gpt2 --iterations 1 --trl --tunix   # + Tunix
    python bench/ppo_iteration.py --shape gpt2 --generate-only --batch 16 --new-tokens 128
    # long rollouts with EOS on (rows finish at different times), after the no-EOS call
    python bench/ppo_iteration.py --shape gpt2 --generate-only --long-rollouts 256,512

Every response is generated to its full length (no EOS during the rollout; TRL's side does
the same), so both sides do the same work. PPO-ptx is off by default (TRL has no ptx term).
With `--trl`, `bench/trl_peer.py` runs in `bench/.venv-trl` (see that file) as a subprocess
after the JAX side, with the same shape, batch, lengths, epochs and minibatches, and the row
reports the ratio of episodes/s. `--tunix` does the same with `bench/tunix_peer.py` (Tunix's
`PPOLearner`, a FLOP-matched Llama-style model) in `bench/.venv-tunix`, phases split alike.

Long rollouts (`--generate-only --long-rollouts 256,512`, bench/long_rollouts.py): EOS on,
rows finish at different times; reports decode steps run, the share of row-steps spent on
rows that had already finished, and useful tokens/s.

Phase FLOPs (model FLOPs as in `bench/common.py`; MFU against the f32 matmul peak measured in
the same run): generate = prefill of P-1 prompt tokens + N one-token decode steps (each
attending over the whole P+N cache, LM head on the N sampled positions); score = policy and
reference forwards (LM head on the N response positions) + value and reward forwards over
P+N tokens; train = 3 × (policy + value forwards) per epoch. The generation roofline is the
bytes one decode step must read (all params + the whole KV cache) / the copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TRL_PYTHON = os.path.join(HERE, ".venv-trl", "bin", "python")
TUNIX_PYTHON = os.path.join(HERE, ".venv-tunix", "bin", "python")

SECTION = "## PPO iteration vs TRL 0.19 and Tunix 0.1.7: episodes/s, phase split and MFU"
INTRO = """
`bench/ppo_iteration.py`: one PPO iteration, `trainers.ppo.iteration` on the parts of
`trainers.ppo.build` (rollout with `sampling.generate`, experience, update + the KL step),
random weights, 1-device mesh, float32 (CPU) or bfloat16 compute with float32 master
weights (GPU), no EOS during the rollout (every response is full length), no ptx term.
Time = median over the timed iterations after one warm-up iteration; episodes/s = batch /
iteration time. Per-phase MFU against the matmul peak of the compute dtype measured in the
same run (`bench/common.py`); the generation roofline = (weight bytes in the compute dtype
+ whole KV cache bytes) per decode step / measured copy bandwidth. `compiles` = XLA backend
compilations during the timed iterations (must be 0). TRL: `bench/trl_peer.py` (TRL 0.19
`PPOTrainer`, PyTorch, same shapes/batch/lengths/epochs/minibatches, random weights, the
best over `--torch-threads`), run in the same invocation after the JAX side. Tunix:
`bench/tunix_peer.py` (Tunix 0.1.7 `PPOLearner`, a Llama-style model with GPT-2 small's
FLOPs per token, same batch/lengths/epochs/minibatches; it rolls out, scores and trains
one minibatch at a time), phases timed alike (generate / score / train, seconds).
Rows before 2026-12-01 are in the section "PPO iteration: ... (vs TRL 0.19 PPOTrainer)".
"""
HEADER = ("| date | shape | B × (P+N) | epochs × mb | iter s | episodes/s | generate s (MFU) | "
          "score s (MFU) | train s (MFU) | gen tok/s (roofline) | compiles | TRL episodes/s "
          "| JAX / TRL | Tunix episodes/s (gen, score, train s) | JAX / Tunix "
          "| matmul peak, bandwidth | machine, load | versions | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

GEN_SECTION = "## Generation roofline: `sampling.generate` vs the memory-bandwidth bound"
GEN_INTRO = """
`bench/ppo_iteration.py --generate-only`: one `sampling.generate` call (random weights, no
EOS, temperature 1, median of the timed calls after a compile call). A decode step must
read every weight in the compute dtype (`sampling.generate` casts float32 master matrices
to it once per call) and the whole KV cache (P + N slots); roofline tok/s = batch × copy
bandwidth / those bytes, the bandwidth measured in the same run (a donated `x + 1` over
256 MiB on a CPU, 2 GiB on a GPU, best of 5). Rows before 2026-11-27's second H200 run
counted float32 weight bytes (what the sampler then read) and a 256 MiB copy.
Prefill and the LM head's FLOPs are not in the bound, so short prompts approach it best.
"""
GEN_HEADER = ("| date | shape | dtype | batch | prompt | new | call s | tok/s | MiB read / step "
              "| bandwidth GB/s | roofline tok/s | of roofline | MFU | compiles | machine, load "
              "| versions | command |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

SHAPES = common.PRESET_SHAPES


def phase_flops(cfg, b: int, p: int, n: int, epochs: int, sampler_logprobs: bool = False
                ) -> dict:
  """Model FLOPs of each phase; the score phase runs the reference, the policy (not with
  `ppo.old_logprobs=sampler`), the value and the reward model forwards."""
  s = p + n
  gen = (common.forward_flops(cfg, b * (p - 1), s, lm_head=True, head_tokens=0)
         + common.forward_flops(cfg, b * n, s, lm_head=True))
  policy_fwd = common.forward_flops(cfg, b * s, s, lm_head=True, head_tokens=b * n)
  scalar_fwd = common.forward_flops(cfg, b * s, s, lm_head=False)
  score = (1 if sampler_logprobs else 2) * policy_fwd + 2 * scalar_fwd
  train = epochs * 3 * (policy_fwd + scalar_fwd)
  return dict(generate=gen, score=score, train=train)


def decode_bytes(cfg, params, b: int, cache_len: int) -> int:
  """Bytes one decode step reads at least: the weights as the sampler reads them
  (`sampling.compute_dtype_weights`, shapes only) and the whole KV cache."""
  import jax
  import numpy as np
  from rlhf_jax import sampling
  read = jax.eval_shape(lambda p: sampling.compute_dtype_weights(cfg, p), params)
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(read))
  itemsize = np.dtype(cfg.dtype).itemsize
  cache = 2 * cfg.num_layers * b * cfg.num_kv_heads * cache_len * cfg.head_dim * itemsize
  return weights + cache


def build(cfg, args, mesh):
  """Random-weight PPO parts from the trainer's own `trainers.ppo.build`, two prompt batches,
  and a one-iteration closure around `trainers.ppo.iteration` (its three phase timers)."""
  import jax
  import numpy as np
  from rlhf_jax import config as config_lib
  from rlhf_jax import models, sampling, sharding
  from rlhf_jax.trainers import model_init, ppo
  from rlhf_jax.trainers import state as state_lib

  conf = config_lib.ppo_config()
  p = conf.ppo
  p.epochs, p.minibatches, p.max_new_tokens = args.epochs, args.minibatches, args.new_tokens
  p.ptx_coef = 0.0
  p.old_logprobs = args.old_logprobs
  p.iterations = max(args.iterations + 1, 1)   # the optimiser schedule's length
  conf.train.batch_size = args.batch
  rules = state_lib.parse_rules("")
  c_shard = state_lib.model_shardings(mesh, cfg, "causal", rules)
  s_shard = state_lib.model_shardings(mesh, cfg, "scalar", rules)
  ref = jax.jit(lambda: models.init(cfg, jax.random.key(0), kind="causal"),
                out_shardings=c_shard)()
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  rs = np.random.RandomState(0)
  prompts = [sharding.host_to_global(mesh, dict(
      input_ids=rs.randint(1, cfg.vocab_size - 1, size=(B, P)).astype(np.int32),
      attention_mask=np.ones((B, P), np.int32))) for _ in range(2)]

  def generate(policy_params, batch, key):
    return sampling.generate(cfg, policy_params, batch["input_ids"], batch["attention_mask"],
                             key, max_new_tokens=N, temperature=p.temperature, top_k=p.top_k,
                             top_p=p.top_p, eos_id=None, pad_id=0)
  if args.generate_only:   # the sampler alone: no value / reward models, no optimisers
    return {"policy": ref}, None, generate, prompts, ref

  reward = jax.jit(lambda: models.causal_to_scalar(
      cfg, models.init(cfg, jax.random.key(1), kind="causal"), jax.random.key(2)),
      out_shardings=s_shard)()
  value = jax.tree.map(jax.numpy.copy, reward)
  # No stop ids: every response is generated to its full length (as on TRL's side); the
  # experience's no-EOS penalty still reads `eos_id`.
  parts = ppo.build(conf, mesh, ppo.Models(
      policy=model_init.Model(cfg, ref, c_shard), value=model_init.Model(cfg, value, s_shard),
      reward=model_init.Model(cfg, reward, s_shard),
      normalization=dict(mean=0.0, std=1.0, gain=False), eos_id=cfg.vocab_size - 1,
      pad_id=0, stop_ids=()), use_ptx=False)
  state = parts.init_state()
  base_key = jax.random.PRNGKey(0)

  def iteration(state, index):
    state, m = ppo.iteration(parts, state, prompts[index % 2], None,
                             jax.random.fold_in(base_key, index))
    return state, dict(generate=m["time_generate"], score=m["time_score"],
                       train=m["time_train"],
                       total=m["time_generate"] + m["time_score"] + m["time_train"],
                       loss=float(m["loss"]),
                       tokens=int(round(float(m["response_length"]) * B)))

  return state, iteration, generate, prompts, ref


def run_peer(name: str, python: str, script: str, args, thread_counts, timeout: int
             ) -> dict | None:
  """Runs a peer script in its venv once per thread count; the fastest RESULT, or None."""
  if not os.path.exists(python):
    print(f"# {name} peer skipped: {python} not found (see bench/{script})", flush=True)
    return None
  best = None
  for threads in thread_counts:
    cmd = [python, os.path.join(HERE, script), "--shape", args.shape,
           "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--epochs", str(args.epochs),
           "--minibatches", str(args.minibatches), "--iterations", str(args.iterations),
           "--threads", str(threads)]
    print("# " + " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
      print(f"# {name} peer timed out after {timeout} s", flush=True)
      continue
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      print(f"# {name} peer failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-3000:]}", flush=True)
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    split = "".join(f", {k} {r[k + '_s']:.2f} s" for k in ("generate", "score", "train")
                    if k + "_s" in r)
    print(f"{name} ({r['threads']} thr): iteration {r['iter_s']:.2f} s (runs "
          f"{', '.join(f'{t:.2f}' for t in r['times'])}), {r['episodes_s']:.3f} episodes/s"
          f"{split}", flush=True)
    if best is None or r["episodes_s"] > best["episodes_s"]:
      best = r
  return best


def run_trl(args) -> dict | None:
  """bench/trl_peer.py in bench/.venv-trl, best over `--torch-threads`."""
  return run_peer("trl", TRL_PYTHON, "trl_peer.py", args,
                  [int(t) for t in args.torch_threads.split(",")], args.trl_timeout)


def run_tunix(args) -> dict | None:
  """bench/tunix_peer.py in bench/.venv-tunix (XLA picks its own threads)."""
  return run_peer("tunix", TUNIX_PYTHON, "tunix_peer.py", args, [os.cpu_count()],
                  args.trl_timeout)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  common.add_ppo_shape_args(ap)
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--generate-only", action="store_true",
                  help="time sampling.generate alone (tokens/s and its roofline)")
  ap.add_argument("--trl", action="store_true", help="also run TRL's PPOTrainer (peer)")
  ap.add_argument("--tunix", action="store_true", help="also run Tunix's PPOLearner (peer)")
  ap.add_argument("--long-rollouts", default="", metavar="N,N",
                  help="with --generate-only: also time these response lengths with EOS on")
  ap.add_argument("--eos-mean", type=float, default=0.5,
                  help="long rollouts: target mean response length as a fraction of N")
  ap.add_argument("--compact", type=int, default=2,
                  help="long rollouts: also time sampling.generate(compact=K) against the "
                  "plain decode loop")
  ap.add_argument("--torch-threads", default=str(os.cpu_count()),
                  help="comma-separated torch thread counts for the peer; fastest reported")
  ap.add_argument("--trl-timeout", type=int, default=3600, help="per peer run, seconds")
  ap.add_argument("--peak-n", type=int, default=2048)
  ap.add_argument("--old-logprobs", choices=["score", "sampler"], default="score",
                  help="ppo.old_logprobs: sampler skips the policy's forward in the score "
                  "phase (its MFU counts the three forwards left)")
  ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
  ap.add_argument("--append", metavar="MD", help="append the row to this markdown file")
  args = ap.parse_args(argv)
  if args.long_rollouts and not args.generate_only:
    ap.error("--long-rollouts needs --generate-only (the peers run without EOS)")
  if args.compact < 1:
    ap.error(f"--compact {args.compact}: the long rollouts compare K >= 1 halvings with the "
             "plain loop")

  import jax
  from rlhf_jax import models, sharding

  cfg = models.get_preset(SHAPES[args.shape], dtype=args.dtype)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  load_start = common.load()
  peak = common.matmul_peak_flops(args.peak_n,
                                  dtype="bfloat16" if args.dtype == "bfloat16" else "float32")
  bw = common.copy_bandwidth()
  B, P, N = args.batch, args.prompt_len, args.new_tokens
  print(f"# {args.shape}: {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s, copy bandwidth {bw / 1e9:.1f} GB/s; "
        f"load {load_start:.2f}", flush=True)
  t0 = time.perf_counter()
  state, iteration, generate, prompts, ref = build(cfg, args, mesh)
  step_bytes = decode_bytes(cfg, ref, B, P + N)
  roofline_tps = B * bw / step_bytes
  print(f"# setup {time.perf_counter() - t0:.1f} s; decode step reads >= "
        f"{step_bytes / 2**20:.0f} MiB -> roofline {roofline_tps:.0f} tok/s", flush=True)
  flops = phase_flops(cfg, B, P, N, args.epochs, args.old_logprobs == "sampler")
  result = dict(shape=args.shape, batch=B, prompt_len=P, new_tokens=N, epochs=args.epochs,
                minibatches=args.minibatches, dtype=args.dtype, peak=peak,
                bandwidth=bw, roofline_tps=roofline_tps, load_start=load_start)

  if args.generate_only:
    key = jax.random.key(0)
    run = lambda: jax.block_until_ready(generate(state["policy"], prompts[0], key))  # noqa
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    with common.CompileCounter() as cc:
      for _ in range(max(args.iterations, 1)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    gen_s = statistics.median(times)
    result.update(generate_s=gen_s, tokens_s=B * N / gen_s, compiles=cc.count,
                  compile_s=max(first - gen_s, 0.0),
                  generate_mfu=flops["generate"] / gen_s / peak)
    print(f"generate: {gen_s:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}), "
          f"{B * N / gen_s:.1f} tok/s = {B * N / gen_s / roofline_tps:.1%} of the roofline "
          f"({roofline_tps:.0f} tok/s), MFU {result['generate_mfu']:.1%}, compile "
          f"~{result['compile_s']:.1f} s, compiles after warm-up {cc.count}; load "
          f"{common.load():.2f}", flush=True)
    row = (f"| {common.today()} | {common.shape_cell(args.shape, cfg)} | {args.dtype} | {B} "
           f"| {P} | {N} | {gen_s:.2f} | {B * N / gen_s:.1f} | {step_bytes / 2**20:.0f} "
           f"| {bw / 1e9:.1f} | {roofline_tps:.0f} | {B * N / gen_s / roofline_tps:.1%} "
           f"| {result['generate_mfu']:.1%} | {cc.count} "
           + common.context_cells([load_start, common.load()], argv, __file__))
    common.publish_rows(args.append, GEN_SECTION, GEN_INTRO, GEN_HEADER, [row])
    if args.long_rollouts:
      _write_json(args, result)   # kept if a long rollout overruns the step's time limit
      import long_rollouts
      result["long_rollouts"] = long_rollouts.run(
          cfg, state["policy"], prompts[0],
          [int(n) for n in args.long_rollouts.split(",")], args, argv, __file__, args.dtype)
    _write_json(args, result)
    return result

  t0 = time.perf_counter()
  state, warm = iteration(state, 0)
  print(f"# warm-up iteration {time.perf_counter() - t0:.1f} s (compiles included): "
        + ", ".join(f"{k} {warm[k]:.1f}" for k in ("generate", "score", "train")), flush=True)
  runs = []
  with common.CompileCounter() as cc:
    for i in range(args.iterations):
      state, m = iteration(state, i + 1)
      runs.append(m)
      print(f"iteration {i + 1}: " + ", ".join(f"{k} {m[k]:.2f} s" for k in
                                                ("generate", "score", "train", "total"))
            + f", loss {m['loss']:.4f}, load {common.load():.2f}", flush=True)
  # Shared box: re-measure the peak after the timed iterations; keep the higher one.
  peak = max(peak, common.matmul_peak_flops(
      args.peak_n, dtype="bfloat16" if args.dtype == "bfloat16" else "float32"))
  result["peak"] = peak
  med = {k: statistics.median(r[k] for r in runs) for k in ("generate", "score", "train", "total")}
  assert all(r["tokens"] == B * N for r in runs), "a row stopped early"
  mfu = {k: flops[k] / med[k] / peak for k in flops}
  result.update(iter_s=med["total"], episodes_s=B / med["total"], phases=med, mfu=mfu,
                compiles=cc.count, gen_tps=B * N / med["generate"],
                total_mfu=sum(flops.values()) / med["total"] / peak)
  print(f"jax: {result['episodes_s']:.3f} episodes/s; generate {med['generate']:.2f} s "
        f"(MFU {mfu['generate']:.1%}, {result['gen_tps']:.0f} tok/s, roofline "
        f"{roofline_tps:.0f}), score {med['score']:.2f} s (MFU {mfu['score']:.1%}), train "
        f"{med['train']:.2f} s (MFU {mfu['train']:.1%}); compiles after warm-up {cc.count}",
        flush=True)
  load_mid = common.load()
  _write_json(args, result)   # the JAX figures survive a peer that overruns a time limit
  trl = run_trl(args) if args.trl else None
  result["trl"] = trl
  ratio = result["episodes_s"] / trl["episodes_s"] if trl else float("nan")
  result["ratio"] = ratio
  if trl:
    print(f"JAX / TRL episodes/s: {ratio:.2f}x", flush=True)
  tunix = run_tunix(args) if args.tunix else None
  result["tunix"] = tunix
  tunix_ratio = result["episodes_s"] / tunix["episodes_s"] if tunix else float("nan")
  result["tunix_ratio"] = tunix_ratio
  if tunix:
    print(f"JAX / Tunix episodes/s: {tunix_ratio:.2f}x", flush=True)
  trl_cell = (f"{trl['episodes_s']:.3f} ({trl['threads']} thr; gen {trl['generate_s']:.1f} s, "
              f"rest {trl['iter_s'] - trl['generate_s']:.1f} s)") if trl else "—"
  tunix_cell = (f"{tunix['episodes_s']:.3f} ({tunix['generate_s']:.2f}, {tunix['score_s']:.2f}, "
                f"{tunix['train_s']:.2f})") if tunix else "—"
  row = (f"| {common.today()} | {common.shape_cell(args.shape, cfg)} | {B} × ({P}+{N}) "
         f"| {args.epochs} × {args.minibatches} "
         f"| {med['total']:.2f} | {result['episodes_s']:.3f} "
         f"| {med['generate']:.2f} ({mfu['generate']:.1%}) | {med['score']:.2f} ({mfu['score']:.1%}) "
         f"| {med['train']:.2f} ({mfu['train']:.1%}) | {result['gen_tps']:.0f} ({roofline_tps:.0f}) "
         f"| {cc.count} | {trl_cell} | {ratio:.2f}× | {tunix_cell} | {tunix_ratio:.2f}× "
         f"| {peak / 1e9:.0f} GFLOP/s, {bw / 1e9:.1f} GB/s "
         + common.context_cells([load_start, load_mid, common.load()], argv, __file__,
                                "".join(f", {r['versions']}" for r in (trl, tunix) if r)))
  common.publish_rows(args.append, SECTION, INTRO, HEADER, [row])
  _write_json(args, result)
  return result


def _write_json(args, result):
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
