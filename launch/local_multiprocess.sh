#!/usr/bin/env bash
# N processes on this machine over loopback (CPU: gloo collectives), each with its own fake
# CPU devices — a real multi-host run in miniature.
#   launch/local_multiprocess.sh 2 --config=configs/sft.py:tiny --workdir=runs/mp
set -euo pipefail
n=${1:?number of processes}; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES_PER_PROCESS:-2}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    python "$(dirname "$0")/train.py" --coordinator_address="127.0.0.1:${port}" \
    --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
