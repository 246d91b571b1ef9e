#!/usr/bin/env bash
# The whole benchmark harness in one go on one GPU (issue 7): a ~1B Llama shape
# (Llama-3.2-1B dims, random weights) in bfloat16 compute with float32 master params.
#
#   bash bench/gpu.sh              # on an H100: JAX (CUDA), PyTorch and transformers preinstalled
#   bash bench/gpu.sh --dry-run    # the same steps with the tiny shape on CPU (checks the script)
#
# No network is needed: the package travels as source (PYTHONPATH=$PWD), nothing is
# downloaded, the TRL / Tunix peers run only where bench/.venv-trl / bench/.venv-tunix exist
# (neither travels to a lent GPU machine: too large). Budget: each step has its
# own `timeout` and the sum stays under 10 minutes; a step that fails or times out is
# recorded in status.txt and the next one still runs. Figures (markdown rows, JSON, logs)
# go to $OUT (default ./bench_out); copy the rows into docs/benchmarks.md.
#
# Python packages: jax with its CUDA plugin, plus what rlhf_jax imports on this path (flax,
# optax, chex, ml_collections, transformers, numpy). flax must match jax: flax 0.12.8 does
# not import under jax >= 0.11 (use flax >= 0.12.9 there). Where the image lacks one, put
# wheels on PYTHONPATH first (2026-11-27, on an H200 image with jax 0.11.2: flax 0.12.12,
# optax 0.2.8, chex 0.1.92, ml_collections 1.1.0 via `pip install --target`); the whole
# run then took 448 s.
#
# Steps:
#   1. train_step.py  SFT + RM step, batch 32 × seq 128: tokens/s, MFU vs the measured bf16
#                     matmul peak (target >= 40 % on an H100).
#   2. ppo_iteration.py --generate-only  batch 64, prompt 64, 128 new tokens: tokens/s vs the
#                     bandwidth roofline (issue 18 target: >= 70 % of it); then, in the same
#                     process, long rollouts of 256 and 512 new tokens with EOS on
#                     (bench/long_rollouts.py): decode steps, finished-row share, tokens/s,
#                     each also with one halving of the decode batch (`compact=1`: one more
#                     decode loop to compile per length, so one halving, not two, to stay
#                     inside the step's limit).
#   3. ppo_iteration.py  one PPO iteration, batch 64, prompt 64 + response 64, 1 epoch × 1
#                     minibatch, so the train phase runs at the paper's minibatch of 64
#                     sequences (issue 18; rows before 2026-12-01 used 32 × 4 minibatches of
#                     8): episodes/s, phase split, train-phase MFU; + the peers where their
#                     venvs exist, inside the same step's time limit.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
# $PYTHON, else the project venv when there is one (a dev box), else the system python (the
# GPU machine, where JAX / torch / transformers come preinstalled).
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=$(command -v python3 || command -v python); fi

if [[ "${1:-}" == "--dry-run" ]]; then
  # The same steps and code paths with less work (a 2-core box shared with other jobs):
  # shorter long rollouts, one timed call / iteration. Not bound by the 10 minutes.
  SHAPE=tiny; DTYPE=float32; PEAK_N=1024; T_TRAIN=600; T_GEN=600; T_PPO=900; T_PEER=400
  LONG=32,64; ITERS=1
  export JAX_PLATFORMS=cpu
else
  # 150 + 190 + 250 = 590 s of step limits (+ ~5 s for machine.txt): inside 10 minutes.
  # 2026-11-27's run took 141 / 120 / 181 s for the three steps without the long rollouts
  # (two more generate compilations, ~25 s each there, + ~5 s of decoding) or the larger
  # PPO batch. generate.json is written before the long rollouts start.
  SHAPE=llama-1b; DTYPE=bfloat16; PEAK_N=8192; T_TRAIN=150; T_GEN=190; T_PPO=250; T_PEER=90
  LONG=256,512; ITERS=2
  # Four 1.2B-param models + two AdamW states (~40 GB in float32) fit an 80 GB H100.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi

: > "$OUT/status.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -n); load: $(cut -d' ' -f1-3 /proc/loadavg)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

step() {   # step NAME SECONDS ARGS...: run one harness step under a time limit, never abort
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
  tail -n 25 "$OUT/$name.log"
}

step train_step "$T_TRAIN" bench/train_step.py --shape "$SHAPE" --dtype "$DTYPE" \
  --batch 32 --seq 128 --steps 5 --peak-n "$PEAK_N" \
  --append "$OUT/benchmarks.md" --json "$OUT/train_step.json"
step generate "$T_GEN" bench/ppo_iteration.py --shape "$SHAPE" --dtype "$DTYPE" \
  --generate-only --batch 64 --prompt-len 64 --new-tokens 128 --iterations $((ITERS + 1)) \
  --long-rollouts "$LONG" --eos-mean 0.5 --compact 1 \
  --peak-n "$PEAK_N" --append "$OUT/benchmarks.md" --json "$OUT/generate.json"
step ppo_iteration "$T_PPO" bench/ppo_iteration.py --shape "$SHAPE" --dtype "$DTYPE" \
  --batch 64 --prompt-len 64 --new-tokens 64 --epochs 1 --minibatches 1 --iterations "$ITERS" \
  --peak-n "$PEAK_N" --append "$OUT/benchmarks.md" --json "$OUT/ppo_iteration.json" \
  --trl-timeout "$T_PEER" \
  $( [[ -x bench/.venv-trl/bin/python ]] && echo --trl ) \
  $( [[ -x bench/.venv-tunix/bin/python ]] && echo --tunix )
# The figures issue 18 asks for, pulled from the JSON (train-phase MFU at minibatch 64,
# the long-rollout generation figures).
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
  try:
    return json.load(open(os.path.join(out, name)))
  except (OSError, ValueError):
    return None
g, p = load("generate.json"), load("ppo_iteration.json")
if p:
  mb = p["batch"] // max(p.get("minibatches", 1), 1)
  print(f"PPO train phase: {p['phases']['train']:.3f} s, MFU {p['mfu']['train']:.1%} "
        f"(minibatch {mb}); iteration {p['iter_s']:.3f} s, {p['episodes_s']:.1f} episodes/s")
  for peer in ("trl", "tunix"):
    if p.get(peer):
      print(f"{peer}: {p[peer]['episodes_s']:.3f} episodes/s")
if g:
  print(f"generate N={g['new_tokens']} (no EOS): {g['tokens_s']:.0f} tok/s = "
        f"{g['tokens_s'] / g['roofline_tps']:.1%} of the roofline")
  for r in g.get("long_rollouts", []):
    print(f"long rollout N={r['new_tokens']} (EOS on): {r['call_s']:.3f} s, decode steps "
          f"{r['steps']}, mean length {r['mean_len']:.1f}, finished-row share "
          f"{r['finished_share']:.1%}, {r['useful_tps']:.0f} useful tok/s; compact="
          f"{r['compact']}: {r['compact_call_s']:.3f} s ({r['compact_speedup']:.2f}x), "
          f"finished-row share {r['compact_finished_share']:.1%}")
PYEOF

echo "figures in $OUT:"; ls -l "$OUT"
! grep -v " rc=0 " "$OUT/status.txt"   # exit non-zero if any step failed
