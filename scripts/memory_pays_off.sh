#!/usr/bin/env bash
# Does the kNN memory pay off at CPU scale? The memory alone, measured over seeds:
#   xl   Transformer-XL with q/k normalised in every layer (configs/txl.py:cpu_qk)
#   knn  the same plus a 2,048-entry kNN memory in layer 1 (configs/knn.py:cpu): with its gate
#        closed it computes exactly xl, so the two differ in the memory alone
# 3 seeds each on the same batches, 2,500 steps; memtx.compare prints mean ± std of the training
# loss of the last 500 steps (documents no run has seen) and of validation perplexity (the first
# 3,072 bytes of 64 validation documents), and the paired difference with a 95% interval. Then
# seed 0 of both on the same documents: loss by copyability (the far bucket is where only the kNN
# memory can help) and the kNN model at sizes 0, 256, 1,024 and 4,096 from its one checkpoint.
# About 35 minutes on 2 idle CPU cores. Extra arguments are config overrides for every training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs/pays_off}
start=$(date +%s)
.venv/bin/python -m memtx.compare --out "$RUNS" --seeds "${SEEDS:-3}" --last-steps 500 --eval-max-docs 64 \
  xl=configs/txl.py:cpu_qk knn=configs/knn.py:cpu \
  --config.data.split_fractions=94,5,1 --config.data.eval_doc_tokens=3072 "$@"
.venv/bin/python -m memtx.evaluate --workdir "$RUNS/xl/seed0" "$RUNS/knn/seed0" --knn-sizes 0,256,1024,4096 \
  --config.data.eval_max_docs=64
echo "total wall time $(( $(date +%s) - start ))s; work directories in $RUNS/{xl,knn}/seed{0,1,2}"
