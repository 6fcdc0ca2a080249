#!/usr/bin/env bash
# The default job: set up the environment if needed, train the CPU Transformer-XL preset on the
# embedded corpus (this interpreter's standard library), then evaluate it on the validation split.
# WORKDIR (default runs/txl_cpu) keeps checkpoints, config.json, metrics.jsonl and TensorBoard
# events; rerunning resumes there. Extra arguments are config overrides (--config.KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
WORKDIR=${WORKDIR:-runs/txl_cpu}
start=$(date +%s)
.venv/bin/python -m memtx.train --config configs/txl.py:cpu --workdir "$WORKDIR" "$@"
.venv/bin/python -m memtx.evaluate --workdir "$WORKDIR"
echo "total wall time $(( $(date +%s) - start ))s; work directory: $WORKDIR"
