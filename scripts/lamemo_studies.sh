#!/usr/bin/env bash
# The LaMemo paper's three studies on the default run's checkpoints (bash scripts/run_default.sh
# first): Transformer-XL (runs/txl_cpu) beside LaMemo (runs/lamemo_cpu), same size and steps.
#   extrapolation       perplexity with memory = m x segment, m in $MULTIPLES (Figure 5); then
#                       again with distances beyond the trained 127 clamped ($OUT/clamp$CLAMP/)
#   alpha               LaMemo's memorizing coefficient per layer against memory index (Figure 6)
#   attention_distance  attention mass over context distance (Figure 1)
# Tables are printed; JSON and PNG files go to $OUT (default runs/studies). Extra arguments go to
# every study, e.g. --max-docs 4 or --split test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs}
OUT=${OUT:-$RUNS/studies}
MULTIPLES=${MULTIPLES:-1,2,3,4,5,6,7,8,9,10}
CLAMP=${CLAMP:-127}  # the longest distance seen in training: memory 64 + segment 64 - 1
for run in txl_cpu lamemo_cpu; do
  if [ ! -d "$RUNS/$run/checkpoints" ]; then
    echo "error: $RUNS/$run has no checkpoints; run bash scripts/run_default.sh first" >&2
    exit 2
  fi
done
start=$(date +%s)
.venv/bin/python -m memtx.studies.extrapolation --workdir "$RUNS/txl_cpu" "$RUNS/lamemo_cpu" --out "$OUT" \
  --multiples "$MULTIPLES" "$@"
.venv/bin/python -m memtx.studies.extrapolation --workdir "$RUNS/txl_cpu" "$RUNS/lamemo_cpu" --out "$OUT/clamp$CLAMP" \
  --multiples "$MULTIPLES" --config.model.clamp_len="$CLAMP" "$@"
.venv/bin/python -m memtx.studies.alpha --workdir "$RUNS/lamemo_cpu" --out "$OUT" "$@"
.venv/bin/python -m memtx.studies.attention_distance --workdir "$RUNS/txl_cpu" "$RUNS/lamemo_cpu" --out "$OUT" "$@"
echo "total wall time $(( $(date +%s) - start ))s; plots and numbers in $OUT/"
