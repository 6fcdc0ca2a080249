#!/usr/bin/env bash
# One training process per node of a GPU cluster, each using all of its node's GPUs; the
# processes join through JAX's distributed runtime. Run it on every node (srun does that):
#
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Without SLURM set the three variables yourself on every node and run the same command:
#   MEMTX_COORDINATOR=host0:12355 MEMTX_NUM_PROCESSES=4 MEMTX_PROCESS_ID=<0..3> launch/gpu_multinode.sh ...
#
# WORKDIR's checkpoints must be on a file system every node sees (or pass
# --config.train.checkpoint_dir=gs://...); process 0 prints and writes metrics.
# MEMTX_PORT (default 12355) is the coordinator's port under SLURM.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
if [ -n "${SLURM_PROCID:-}" ] && [ -z "${MEMTX_NUM_PROCESSES:-}" ]; then
  # The first host of the job's node list is the coordinator (process 0).
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MEMTX_COORDINATOR="$head:${MEMTX_PORT:-12355}"
  export MEMTX_NUM_PROCESSES=$SLURM_NTASKS MEMTX_PROCESS_ID=$SLURM_PROCID
fi
: "${MEMTX_NUM_PROCESSES:?set MEMTX_NUM_PROCESSES (or run under srun)}"
: "${MEMTX_PROCESS_ID:?set MEMTX_PROCESS_ID}" "${MEMTX_COORDINATOR:?set MEMTX_COORDINATOR=host:port of process 0}"
[ -x .venv/bin/python ] || { echo "error: no .venv here: run bash scripts/setup_env.sh on a shared checkout first" >&2; exit 2; }
exec .venv/bin/python -m memtx.train --config "$config" --workdir "$workdir" "$@"
