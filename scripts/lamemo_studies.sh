#!/usr/bin/env bash
# The LaMemo paper's three studies on the default run's checkpoints (bash scripts/run_default.sh
# first): seed 0's Transformer-XL ($RUNS/xl/seed0) beside LaMemo ($RUNS/lamemo/seed0), same size
# and steps, on the first 3,072 bytes of 64 validation documents as the default run evaluates.
#   extrapolation       perplexity with memory = m x segment, m in $MULTIPLES (Figure 5); then
#                       again with distances beyond the trained 127 clamped ($OUT/clamp$CLAMP/)
#   alpha               LaMemo's memorizing coefficient per layer against memory index (Figure 6)
#   attention_distance  attention mass over context distance (Figure 1)
# Tables are printed; JSON and PNG files go to $OUT (default $RUNS/studies), named by a hash of
# what was studied. Extra arguments go to every study, e.g. --config.data.eval_max_docs=4 or
# --split test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs/default}
OUT=${OUT:-$RUNS/studies}
MULTIPLES=${MULTIPLES:-1,2,3,4,5,6,7,8,9,10}
CLAMP=${CLAMP:-127}  # the longest distance seen in training: memory 64 + segment 64 - 1
for run in xl/seed0 lamemo/seed0; do
  if [ ! -d "$RUNS/$run/checkpoints" ]; then
    echo "error: $RUNS/$run has no checkpoints; run bash scripts/run_default.sh first" >&2
    exit 2
  fi
done
common=(--config.data.eval_max_docs=64 --config.data.eval_doc_tokens=3072)
start=$(date +%s)
.venv/bin/python -m memtx.studies.extrapolation --workdir "$RUNS/xl/seed0" "$RUNS/lamemo/seed0" --out "$OUT" \
  --multiples "$MULTIPLES" "${common[@]}" "$@"
.venv/bin/python -m memtx.studies.extrapolation --workdir "$RUNS/xl/seed0" "$RUNS/lamemo/seed0" --out "$OUT/clamp$CLAMP" \
  --multiples "$MULTIPLES" --config.model.clamp_len="$CLAMP" "${common[@]}" "$@"
.venv/bin/python -m memtx.studies.alpha --workdir "$RUNS/lamemo/seed0" --out "$OUT" "${common[@]}" "$@"
.venv/bin/python -m memtx.studies.attention_distance --workdir "$RUNS/xl/seed0" "$RUNS/lamemo/seed0" --out "$OUT" "${common[@]}" "$@"
echo "total wall time $(( $(date +%s) - start ))s; plots and numbers in $OUT/"
