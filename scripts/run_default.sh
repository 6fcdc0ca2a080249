#!/usr/bin/env bash
# The default job: set up the environment if needed, then on the embedded corpus (this
# interpreter's standard library source) train
#   runs/txl_cpu   the CPU Transformer-XL (configs/txl.py:cpu)
#   runs/knn_cpu   the same model plus a Memorizing Transformer kNN memory (configs/knn.py:cpu)
# and evaluate both on the validation documents in one table: the Transformer-XL, and the kNN
# model at several memory sizes (one checkpoint, memory size is not a parameter), with a plot
# in runs/knn_cpu/. Rerunning resumes/reuses the work directories (RUNS=... moves them).
# Extra arguments are config overrides for both trainings (--config.KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs}
start=$(date +%s)
.venv/bin/python -m memtx.train --config configs/txl.py:cpu --workdir "$RUNS/txl_cpu" "$@"
.venv/bin/python -m memtx.train --config configs/knn.py:cpu --workdir "$RUNS/knn_cpu" "$@"
.venv/bin/python -m memtx.evaluate --workdir "$RUNS/txl_cpu" "$RUNS/knn_cpu" --knn-sizes 0,256,1024,4096
echo "total wall time $(( $(date +%s) - start ))s; work directories: $RUNS/txl_cpu $RUNS/knn_cpu"
