# Shared launcher for the example scripts (sourced, not run).
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: multi-node rendezvous (SLURM sets them via
#   examples/slurm.sbatch); GPUS_PER_NODE defaults to 8.
#   DRY_RUN=1: validate the configuration and print the parallel plan for the full world
#   size without GPUs, torchrun or data (what tests/examples/test_launch_scripts.py runs).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

launch() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    "$PYTHON" "$REPO/tools/train.py" --dry-run --world-size "$WORLD_SIZE" "$@"
  else
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" \
      --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}" \
      --master-port "${MASTER_PORT:-29500}" "$REPO/tools/train.py" "$@"
  fi
}
