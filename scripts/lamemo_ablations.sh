#!/usr/bin/env bash
# The LaMemo paper's Table 3 ablations at CPU scale: trains configs/lamemo.py:cpu with one part
# switched off (the same size, steps and batches as the default run's runs/lamemo_cpu), then
# evaluates them beside the default run's Transformer-XL and LaMemo in one table.
#   runs/lamemo_cpu_no_interpolation   alpha = 0
#   runs/lamemo_cpu_no_look_ahead      memory never refreshed (Transformer-XL's forward pass)
#   runs/lamemo_cpu_xl_encoding        the look-ahead scored with Transformer-XL's encoding
# Run bash scripts/run_default.sh first. Extra arguments are config overrides for the trainings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs}
for run in txl_cpu lamemo_cpu; do
  if [ ! -d "$RUNS/$run/checkpoints" ]; then
    echo "error: $RUNS/$run has no checkpoints; run bash scripts/run_default.sh first" >&2
    exit 2
  fi
done
start=$(date +%s)
runs=("$RUNS/txl_cpu" "$RUNS/lamemo_cpu")
for ablation in no_interpolation no_look_ahead xl_encoding; do
  .venv/bin/python -m memtx.train --config "configs/lamemo.py:cpu_$ablation" --workdir "$RUNS/lamemo_cpu_$ablation" "$@"
  runs+=("$RUNS/lamemo_cpu_$ablation")
done
.venv/bin/python -m memtx.evaluate --workdir "${runs[@]}"
echo "total wall time $(( $(date +%s) - start ))s"
