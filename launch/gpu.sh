#!/usr/bin/env bash
# One host with one or more GPUs: the target axis is sharded over every visible GPU.
# Needs a CUDA build of jax on the host, e.g. `pip install -U "jax[cuda12]"`.
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu.sh configs/entropy_sweep.py runs/entropy [overrides...]
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
# Let XLA take GPU memory as it needs it, so the automatic chunk size sees what is really free.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec distprompt --config="$config" --workdir="$workdir" "$@"
