#!/usr/bin/env bash
# A TPU pod slice: every worker runs this same command (jax.distributed.initialize finds the others).
# The workdir must be on storage all workers share (a mounted bucket or NFS); process 0 writes the
# config, targets and results, each process optimizes its own share of the targets.
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd distprompt_jax && launch/tpu_pod.sh configs/entropy_sweep.py /mnt/shared/runs/entropy"
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
shift 2
exec distprompt --distributed --config="$config" --workdir="$workdir" "$@"
