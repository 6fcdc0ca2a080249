#!/usr/bin/env bash
# The LaMemo paper's Table 3 ablations at CPU scale: trains configs/lamemo.py:cpu with one part
# switched off, with the default run's settings and seed 0's batches (so each is paired with
# $RUNS/lamemo/seed0 on the same documents), then evaluates them beside the default run's seed-0
# Transformer-XL and LaMemo in one table, with paired differences to Transformer-XL:
#   $RUNS/lamemo_no_interpolation/seed0   alpha = 0
#   $RUNS/lamemo_no_look_ahead/seed0      memory never refreshed (Transformer-XL's forward pass)
#   $RUNS/lamemo_xl_encoding/seed0        the look-ahead scored with Transformer-XL's encoding
# One seed each: a difference smaller than the default run's seed-to-seed spread is not a finding.
# Run bash scripts/run_default.sh first. Extra arguments are config overrides for the trainings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs/default}
for run in xl/seed0 lamemo/seed0; do
  if [ ! -d "$RUNS/$run/checkpoints" ]; then
    echo "error: $RUNS/$run has no checkpoints; run bash scripts/run_default.sh first" >&2
    exit 2
  fi
done
# As scripts/run_default.sh trains and evaluates.
common=(--config.data.split_fractions=94,5,1 --config.data.eval_doc_tokens=3072 --config.train.steps=1000
        --config.optim.warmup_steps=100 --config.train.seed=0)
start=$(date +%s)
runs=("$RUNS/xl/seed0" "$RUNS/lamemo/seed0")
for ablation in no_interpolation no_look_ahead xl_encoding; do
  .venv/bin/python -m memtx.train --config "configs/lamemo.py:cpu_$ablation" --workdir "$RUNS/lamemo_$ablation/seed0" \
    "${common[@]}" "$@"
  runs+=("$RUNS/lamemo_$ablation/seed0")
done
.venv/bin/python -m memtx.evaluate --workdir "${runs[@]}" --config.data.eval_max_docs=64
echo "total wall time $(( $(date +%s) - start ))s"
