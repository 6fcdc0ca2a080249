#!/usr/bin/env bash
# The default job: set up the environment if needed, then on the embedded corpus (this
# interpreter's standard library source) train four models of the same size (4 layers, d 128,
# segment 64) for the same 2,500 steps of the same batches:
#   runs/rpe_cpu     no memory: Transformer+RPE (configs/txl.py:cpu_rpe)
#   runs/txl_cpu     Transformer-XL, memory 64 (configs/txl.py:cpu)
#   runs/lamemo_cpu  LaMemo's look-ahead memory, memory 64 (configs/lamemo.py:cpu)
#   runs/knn_cpu     Transformer-XL plus a Memorizing Transformer kNN memory (configs/knn.py:cpu)
# and evaluate them on the validation documents in one table, the kNN model at several memory
# sizes (one checkpoint: memory size is not a parameter), with a plot in runs/knn_cpu/.
# Rerunning resumes/reuses the work directories (RUNS=... moves them).
# Extra arguments are config overrides for every training (--config.KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs}
start=$(date +%s)
.venv/bin/python -m memtx.train --config configs/txl.py:cpu_rpe --workdir "$RUNS/rpe_cpu" "$@"
.venv/bin/python -m memtx.train --config configs/txl.py:cpu --workdir "$RUNS/txl_cpu" "$@"
.venv/bin/python -m memtx.train --config configs/lamemo.py:cpu --workdir "$RUNS/lamemo_cpu" "$@"
.venv/bin/python -m memtx.train --config configs/knn.py:cpu --workdir "$RUNS/knn_cpu" "$@"
.venv/bin/python -m memtx.evaluate --workdir "$RUNS/rpe_cpu" "$RUNS/txl_cpu" "$RUNS/lamemo_cpu" "$RUNS/knn_cpu" \
  --knn-sizes 0,256,1024,4096
echo "total wall time $(( $(date +%s) - start ))s; work directories in $RUNS/: rpe_cpu txl_cpu lamemo_cpu knn_cpu"
