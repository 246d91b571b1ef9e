#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker; jax.distributed auto-detects the pod.
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/ppo.py --workdir=gs://bucket/runs/ppo
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ~/rlhf_jax && source .venv/bin/activate && python launch/train.py ${args}"
