#!/usr/bin/env bash
# The accelerator figures of the README's speed section, in one short run on one GPU or TPU host
# (no TensorFlow needed; synthetic tokens):
#   1. the paper-size kNN train step at 0 / 8K / 65K / 262K slots for every backend, as a ratio
#      to no memory, with each lookup beside its floor and the approximate backends' recall@32;
#   2. LaMemo against Transformer-XL wall time at the wt103 preset;
#   3. the wt103 Transformer-XL's step time, tokens/s and MFU (model FLOPs / the device's peak);
#   4. its compile and step time against depth, the layers unrolled and scanned (model.scan_layers).
# And, on its own (PART=pays_off; about as long as one call allows, so not with the others):
#   5. does the kNN memory pay off on natural text past the induction-head onset? The comparison
#      of scripts/memory_pays_off.sh (configs/txl.py:cpu_qk against configs/knn.py:cpu, 3 seeds on
#      the same batches, paired differences with 95% intervals) at batch 64 and 16,000 steps:
#      65.5M tokens, 1.5-2x the onset the README estimates (Aoyama, Wilcox & Schneider 2025), with
#      smeared keys in the memory layer of both models (what the recall task showed decides).
#
#   bash benchmarks/accelerator_suite.sh [OUT_DIR]                 (default: results/accelerator)
#   PART=pays_off bash benchmarks/accelerator_suite.sh [OUT_DIR]
#
# Each part writes its table to OUT_DIR/*.md as it finishes, so a run cut short keeps what it has.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/accelerator}
mkdir -p "$out"
py=${PYTHON:-python3}
"$py" -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
if [ "${PART:-speed}" = pays_off ]; then
  "$py" -m memtx.compare --out "$out/pays_off_onset" --seeds 3 --last-steps 2000 --eval-max-docs 64 \
      xl=configs/txl.py:cpu_qk knn=configs/knn.py:cpu --config.data.split_fractions=94,5,1 \
      --config.data.eval_doc_tokens=3072 --config.data.batch_size=64 --config.train.steps=16000 \
      --config.train.log_every=1000 --config.model.smeared_keys=1, | tee "$out/pays_off_onset.md"
  exit 0
fi
"$py" benchmarks/knn_step_time.py --config configs/knn.py:paper_65536 --sizes 0,8192,65536,262144 \
    --backends approx,blocked,bucketed,exact --steps 5 | tee "$out/knn_step_time.md"
"$py" benchmarks/lamemo_step_time.py --config configs/lamemo.py:wt103 --steps 10 | tee "$out/lamemo_vs_xl.md"
"$py" benchmarks/step_time.py --config configs/txl.py:wt103 --steps 10 | tee "$out/txl_wt103_mfu.md"
"$py" benchmarks/compile_time.py --config configs/txl.py:wt103 --depths 4,8,16,32 --steps 5 \
    | tee "$out/compile_time.md"
