#!/usr/bin/env bash
# N processes on this machine over loopback (CPU: gloo collectives), each with its own fake
# CPU devices — a real multi-host run in miniature.
#   launch/local_multiprocess.sh 2 --config=configs/sft.py:tiny --workdir=runs/mp
# Env: DEVICES_PER_PROCESS (default 2), PORT (default random). Ctrl-C / SIGTERM reach every
# process. If one process dies the others exit within --heartbeat_timeout seconds (default
# 100); the script exits with the first non-zero status. Rerun the same command to resume.
set -euo pipefail
n=${1:?number of processes}; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES_PER_PROCESS:-2}
pids=()
# Forward a stop to every process (each checkpoints at its next step on SIGTERM).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    python "$(dirname "$0")/train.py" --coordinator_address="127.0.0.1:${port}" \
    --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  code=0
  # `wait` returns early (>128) when a trapped signal arrives: wait again for the exit.
  while true; do
    wait "${pids[$i]}" && code=0 || code=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if ((code != 0)); then
    echo "local_multiprocess.sh: process $i exited with status $code" >&2
    ((status == 0)) && status=$code
  fi
done
exit $status
