#!/usr/bin/env bash
# The accelerator figures of the README's speed section, in one short run on one GPU or TPU host
# (no TensorFlow needed; synthetic tokens):
#   1. the paper-size kNN train step at 0 / 8K / 65K / 262K slots for every backend, as a ratio
#      to no memory, with each lookup beside its floor and the approximate backends' recall@32;
#   2. LaMemo against Transformer-XL wall time at the wt103 preset;
#   3. the wt103 Transformer-XL's step time, tokens/s and MFU (model FLOPs / the device's peak);
#   4. its compile and step time against depth, the layers unrolled and scanned (model.scan_layers).
#
#   bash benchmarks/accelerator_suite.sh [OUT_DIR]      (default: results/accelerator)
#
# Each part writes its table to OUT_DIR/*.md as it finishes, so a run cut short keeps what it has.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/accelerator}
mkdir -p "$out"
py=${PYTHON:-python3}
"$py" -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
"$py" benchmarks/knn_step_time.py --config configs/knn.py:paper_65536 --sizes 0,8192,65536,262144 \
    --backends approx,blocked,bucketed,exact --steps 5 | tee "$out/knn_step_time.md"
"$py" benchmarks/lamemo_step_time.py --config configs/lamemo.py:wt103 --steps 10 | tee "$out/lamemo_vs_xl.md"
"$py" benchmarks/step_time.py --config configs/txl.py:wt103 --steps 10 | tee "$out/txl_wt103_mfu.md"
"$py" benchmarks/compile_time.py --config configs/txl.py:wt103 --depths 4,8,16,32 --steps 5 \
    | tee "$out/compile_time.md"
