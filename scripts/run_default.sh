#!/usr/bin/env bash
# The default job: set up the environment if needed, then on the embedded corpus (this
# interpreter's standard library source; its fingerprint is printed) train six models of the same
# size (4 layers, d 128, segment 64) with 3 seeds each (train.seed 0..2), every seed of every model
# reading the same batches, 1,000 steps each:
#   xl      Transformer-XL, memory 64 (configs/txl.py:cpu): the baseline of the paired differences
#   rpe     no memory: Transformer+RPE (configs/txl.py:cpu_rpe)
#   lamemo  LaMemo's look-ahead memory, memory 64 (configs/lamemo.py:cpu)
#   knn     Transformer-XL plus a 2,048-entry kNN memory in layer 1, q/k normalised in every
#           layer as meliad (configs/knn.py:cpu)
#   compressive  Transformer-XL memory 64 plus 64 compressed slots at rate 2 (a 1-D convolution
#           trained by the attention-reconstruction loss; configs/compressive.py:cpu)
#   block_recurrent  Block-Recurrent Transformer: 2 blocks of 32 per segment, each attending over
#           the 64 positions before it, 32 state vectors in layer 1 (configs/block_recurrent.py:cpu)
# then, with memtx.compare, report each model's mean ± std over seeds of the training loss of the
# last fifth of the steps (200: documents no run has seen before) and of validation perplexity (the first 3,072
# bytes of 64 validation documents: data.split_fractions 94,5,1), and each model's paired
# difference to Transformer-XL with a 95% interval ("within noise" when it covers 0); then every
# checkpoint again with the output cache (a test-time continuous cache of the model's own output
# states, 3,072 entries: the whole document; theta, lambda and fill fitted per checkpoint on the 22
# validation documents after the reported 64) against itself without it, its weight set three ways
# (lambda growing with the fill, the best fixed lambda, a learned gate) and the last two paired with
# the first over seeds. Last, seed 0's
# XL and kNN checkpoints on the same documents: perplexity with bootstrap intervals, the paired
# difference, loss by position and by copyability, and the kNN model at memory sizes 0, 256, 1,024
# and 4,096 from its one checkpoint, plotted in $RUNS/knn/seed0/.
# Rerunning reuses finished runs and evaluations (RUNS=... moves them). Extra arguments are
# config overrides for every training (--config.KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUNS=${RUNS:-runs/default}
start=$(date +%s)
common=(--config.data.split_fractions=94,5,1 --config.data.eval_doc_tokens=3072 --config.train.steps=1000
        --config.optim.warmup_steps=100)
MODELS=${MODELS:-xl=configs/txl.py:cpu rpe=configs/txl.py:cpu_rpe lamemo=configs/lamemo.py:cpu knn=configs/knn.py:cpu compressive=configs/compressive.py:cpu
  block_recurrent=configs/block_recurrent.py:cpu}
.venv/bin/python -m memtx.compare --out "$RUNS" --seeds "${SEEDS:-3}" --eval-max-docs 64 --cache-size 3072 \
  --cache-tune-docs 22 --cache-mixtures fill,fixed,gate $MODELS "${common[@]}" "$@"
.venv/bin/python -m memtx.evaluate --workdir "$RUNS/xl/seed0" "$RUNS/knn/seed0" --knn-sizes 0,256,1024,4096 \
  --config.data.eval_max_docs=64
names=$(for m in $MODELS; do printf '%s,' "${m%%=*}"; done)
echo "total wall time $(( $(date +%s) - start ))s; work directories in $RUNS/{${names%,}}/seed{0..$(( ${SEEDS:-3} - 1 ))}"
