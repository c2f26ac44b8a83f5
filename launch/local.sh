#!/usr/bin/env bash
# One machine, all its devices (CPU cores or local GPUs).
#   launch/local.sh configs/quickstart.py runs/quickstart [--config.soft.max_steps=300 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec distprompt --config="$config" --workdir="$workdir" "$@"
