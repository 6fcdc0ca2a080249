#!/usr/bin/env bash
# Train then evaluate one config on this machine: launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m memtx.train --config "$config" --workdir "$workdir" "$@"
.venv/bin/python -m memtx.evaluate --workdir "$workdir"
