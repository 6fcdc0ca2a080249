#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, put this commit on every worker, install, and
# run the same training command on all workers at once (JAX joins them by itself on a TPU VM).
#
#   launch/tpu_vm.sh create   NAME ZONE ACCELERATOR [VERSION]   # e.g. my-v4 us-central2-b v4-32
#   launch/tpu_vm.sh setup    NAME ZONE                          # copy this commit, install .venv
#   launch/tpu_vm.sh train    NAME ZONE CONFIG GS_RUN [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh logs     NAME ZONE                          # follow worker 0's log
#   launch/tpu_vm.sh sync     NAME ZONE GS_RUN                   # worker 0's config, metrics, log -> GS_RUN
#   launch/tpu_vm.sh delete   NAME ZONE
#
# GS_RUN (gs://BUCKET/runs/NAME) holds the checkpoints (train.checkpoint_dir, written by every
# worker through orbax); each worker keeps its work directory (config.json, metrics from worker
# 0, the log) in ~/memtx_runs/NAME, which `sync` copies to GS_RUN/workdir. Data comes from gs://:
#   --config.data.task=pg19 --config.data.data_dir=gs://BUCKET/tensorflow_datasets
# Rerunning `train` after a preemption resumes from the latest checkpoint in GS_RUN.
set -euo pipefail
cmd=${1:-}; name=${2:-}; zone=${3:-}
usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ -n "$cmd" ] && [ -n "$name" ] && [ -n "$zone" ] || usage
command -v gcloud >/dev/null || { echo "error: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
cd "$(dirname "$0")/.."
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }

case "$cmd" in
  create)
    accel=${4:?accelerator type, e.g. v4-32, v5litepod-16, v6e-8}
    version=${5:-tpu-ubuntu2204-base}
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version"
    ;;
  setup)
    # The committed tree of HEAD, the same on every worker (uncommitted changes are not sent).
    git archive --format=tar.gz -o /tmp/memtx.tgz HEAD
    gcloud compute tpus tpu-vm scp /tmp/memtx.tgz "$name":~/memtx.tgz --zone "$zone" --worker=all
    ssh_all 'set -e; rm -rf ~/memtx && mkdir ~/memtx && tar xzf ~/memtx.tgz -C ~/memtx && cd ~/memtx &&
             PYTHON=python3 bash scripts/setup_env.sh && .venv/bin/pip install -q "jax[tpu]==$(.venv/bin/python -c "import jax; print(jax.__version__)")"'
    ;;
  train)
    config=${4:?config, e.g. configs/txl.py:wt103}; run=${5:?gs://BUCKET/runs/NAME}
    shift 5
    case "$run" in gs://*) ;; *) echo "error: the run directory must be on gs:// (every worker writes checkpoints there)" >&2; exit 2;; esac
    extra=$(printf ' %q' "$@")
    runname=$(basename "$run")
    # nohup: the run survives the ssh session; MEMTX_DISTRIBUTED=auto: JAX reads the slice's metadata.
    ssh_all "cd ~/memtx && mkdir -p ~/memtx_runs/$runname && MEMTX_DISTRIBUTED=auto nohup .venv/bin/python -m memtx.train \
             --config $config --workdir ~/memtx_runs/$runname --config.train.checkpoint_dir=$run/checkpoints $extra \
             > ~/memtx_runs/$runname/train.log 2>&1 &"
    echo "started on every worker; follow worker 0 with: launch/tpu_vm.sh logs $name $zone"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 --command 'tail -F ~/memtx_runs/*/train.log'
    ;;
  sync)
    run=${4:?gs://BUCKET/runs/NAME}
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 \
      --command "gsutil -m rsync -r ~/memtx_runs/$(basename "$run") $run/workdir"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *) usage ;;
esac
