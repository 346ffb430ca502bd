#!/usr/bin/env bash
# Many nodes through the DeepSpeed launcher: run once, from any host that reaches every host of the
# hostfile over passwordless ssh (pdsh if installed); it starts every node. Each node must see the repo,
# the venv, the checkpoints and the shards at the same paths.
#   launch/multi_node.sh launch/hostfile.example --config configs/vidarc_causal.yaml \
#       --ds-config ds_configs/zero3_64xh100.json --output_dir /shared/outputs/vidarc --resume auto
# MASTER_ADDR: where the ranks meet; by default DeepSpeed's choice, the address of the hostfile's first
# host, where rank 0 runs (this host's address would leave every rank waiting when run from a login node).
# MASTER_PORT defaults to 29500.
# Preemption: a SIGTERM to this script reaches the ranks (launch/forward_sigterm.py; over pdsh, DeepSpeed's
# runner passes it to every host), which finish their step, save a checkpoint and exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then echo "usage: $0 HOSTFILE [launch/train.py flags]" >&2; exit 2; fi
hostfile="$1"; shift
cd "$root"
venv="${VIDARTRAIN_VENV:-$root/.venv}"
master_addr=()
if [ -n "${MASTER_ADDR:-}" ]; then master_addr=(--master_addr "$MASTER_ADDR"); fi
exec "$venv/bin/python" launch/forward_sigterm.py "$venv/bin/deepspeed" --hostfile "$hostfile" \
    ${master_addr[@]+"${master_addr[@]}"} --master_port "${MASTER_PORT:-29500}" launch/train.py "$@"
