#!/usr/bin/env bash
# The torchrun equivalent, one command per node (no ssh needed; start it on every node):
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node-01 launch/torchrun_node.sh 8 \
#       --config configs/vidarc_causal.yaml --ds-config ds_configs/zero3_64xh100.json --output_dir /shared/outputs/vidarc
# Single node: launch/torchrun_node.sh 8 --config … (NNODES defaults to 1).
# Rendezvous is torchrun's c10d store on MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500).
# Preemption: torchrun passes a SIGTERM on to its ranks, which save a checkpoint and exit; it kills them
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (torch's default, 30 s, can be too short for a 5B save).
set -euo pipefail
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then echo "usage: $0 PROCESSES_PER_NODE [launch/train.py flags]" >&2; exit 2; fi
nproc="$1"; shift
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    # every node would wait for a rendezvous on its own 127.0.0.1 until torchrun's timeout
    echo "error: NNODES=$NNODES needs MASTER_ADDR, the host name of the node every node meets at (NODE_RANK 0)" >&2
    exit 2
fi
cd "$root"
exec "${VIDARTRAIN_VENV:-$root/.venv}/bin/torchrun" --nnodes "${NNODES:-1}" --nproc_per_node "$nproc" \
    --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d --rdzv_id "${RDZV_ID:-vidartrain}" \
    --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    launch/train.py "$@"
