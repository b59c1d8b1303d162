#!/usr/bin/env bash
# Train on several machines: run this once on every node with the same NNODES, RDZV_ENDPOINT
# and RDZV_ID.
#
# Usage: NNODES=4 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29400 launch/multinode.sh [train args...]
#   NNODES         number of machines
#   NODE_RANK      this machine's index, 0..NNODES-1
#   RDZV_ENDPOINT  host:port of the c10d rendezvous store, hosted by the node whose address it
#                  names. The store has no authentication: use a private interface only.
#   NPROC          ranks on this machine (default: NUMA nodes with allowed CPUs)
#   RDZV_ID        job id shared by all nodes (default: qatdist-<port>)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/torchrun" ]]; then
    torchrun="$repo/.venv/bin/torchrun"
    python="$repo/.venv/bin/python"
else
    torchrun="$(command -v torchrun)" || { echo "multinode.sh: torchrun not found" >&2; exit 1; }
    python="$(command -v python3)"
fi

missing=()
for var in NNODES NODE_RANK RDZV_ENDPOINT; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
done
if (( ${#missing[@]} )); then
    echo "multinode.sh: set ${missing[*]} (see the header of $0 for what each means)" >&2
    exit 2
fi
if ! [[ "$RDZV_ENDPOINT" =~ ^.+:[0-9]+$ ]]; then
    echo "multinode.sh: RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'" >&2
    exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "multinode.sh: need NNODES >= 1 and 0 <= NODE_RANK < NNODES," \
        "got NNODES='$NNODES' NODE_RANK='$NODE_RANK'" >&2
    exit 2
fi

if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$python" -m qatdist.topology --count-nodes)"
fi
RDZV_ID="${RDZV_ID:-qatdist-${RDZV_ENDPOINT##*:}}"

exec "$torchrun" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" \
    --rdzv_id="$RDZV_ID" \
    -m qatdist.train "$@"
