#!/usr/bin/env bash
# The accelerator figures of the README's speed section, in one short run on one GPU or TPU host
# (no TensorFlow needed; synthetic tokens):
#   1. the paper-size kNN train step at 0 / 8K / 65K / 262K slots for every backend, as a ratio
#      to no memory, with each lookup beside its floor and the approximate backends' recall@32;
#   2. LaMemo against Transformer-XL wall time at the wt103 preset;
#   3. the wt103 Transformer-XL's step time, tokens/s and MFU (model FLOPs / the device's peak);
#   4. its compile and step time against depth, the layers unrolled and scanned (model.scan_layers);
#   5. what model.remat saves in memory and costs in time, per policy, for it and the 65K kNN preset.
# And, on its own (PART=pays_off; about as long as one call allows, so not with the others):
#   6. does the kNN memory pay off on natural text past the induction-head onset? The comparison
#      of scripts/memory_pays_off.sh (configs/txl.py:cpu_qk against configs/knn.py:cpu, 3 seeds on
#      the same batches, paired differences with 95% intervals) at batch 64 and 16,000 steps:
#      65.5M tokens, 1.5-2x the onset the README estimates (Aoyama, Wilcox & Schneider 2025), with
#      smeared keys in the memory layer of both models (what the recall task showed decides).
#
#   bash benchmarks/accelerator_suite.sh [OUT_DIR]                 (default: results/accelerator)
#   PART=pays_off bash benchmarks/accelerator_suite.sh [OUT_DIR]
#
# Each part writes its table to OUT_DIR/*.md as it finishes, so a run cut short keeps what it has.
# SMOKE=1 runs every part at the CPU presets' size for a step or two (a few minutes on 2 CPU
# cores): a check here that the script runs through, not a figure (tests/test_accelerator_suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/accelerator}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands, small
  knn=configs/knn.py:cpu sizes=0,1536 lamemo=configs/lamemo.py:cpu txl=configs/txl.py:cpu depths=2,4 steps=1
  remat_presets="txl.py:cpu knn.py:cpu" onset=(--seeds 1 --last-steps 2 --eval-max-docs 2 --config.data.batch_size=8
                                               --config.train.steps=4 --config.optim.warmup_steps=1 --config.train.log_every=2)
else
  knn=configs/knn.py:paper_65536 sizes=0,8192,65536,262144 lamemo=configs/lamemo.py:wt103 txl=configs/txl.py:wt103
  depths=4,8,16,32 steps=5 remat_presets="txl.py:wt103 knn.py:paper_65536"
  onset=(--seeds 3 --last-steps 2000 --eval-max-docs 64 --config.data.batch_size=64 --config.train.steps=16000
         --config.train.log_every=1000)
fi
"$py" -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
if [ "${PART:-speed}" = pays_off ]; then
  "$py" -m memtx.compare --out "$out/pays_off_onset" "${onset[@]}" \
      xl=configs/txl.py:cpu_qk knn=configs/knn.py:cpu --config.data.split_fractions=94,5,1 \
      --config.data.eval_doc_tokens=3072 --config.model.smeared_keys=1, | tee "$out/pays_off_onset.md"
  exit 0
fi
"$py" benchmarks/knn_step_time.py --config "$knn" --sizes "$sizes" \
    --backends approx,blocked,bucketed,exact --steps "$steps" | tee "$out/knn_step_time.md"
"$py" benchmarks/lamemo_step_time.py --config "$lamemo" --steps $((2 * steps)) | tee "$out/lamemo_vs_xl.md"
"$py" benchmarks/step_time.py --config "$txl" --steps $((2 * steps)) | tee "$out/txl_wt103_mfu.md"
"$py" benchmarks/compile_time.py --config "$txl" --depths "$depths" --steps "$steps" | tee "$out/compile_time.md"
for preset in $remat_presets; do
  "$py" benchmarks/remat_memory.py --config "configs/$preset" --steps "$steps"
done | tee "$out/remat_memory.md"
