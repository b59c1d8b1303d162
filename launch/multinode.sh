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
#   MAX_RESTARTS   worker group restarts torchrun may make before failing (default 0)
#
# Network: by default each host asks the kernel which local address and interface route to
# RDZV_ENDPOINT's host (`python -m qatdist.topology --route-to HOST`), because the hostname
# often resolves to loopback on cluster images and torchrun and gloo would use that. Set any of
# these to override what is computed (docs/placement.md, "Several machines"):
#   LOCAL_ADDR          the address torchrun advertises for this host (--local_addr; the other
#                       hosts connect to it when this host's agent leads the job)
#   GLOO_SOCKET_IFNAME  the interface(s) gloo binds to (default: the one holding that address)
#   RDZV_IS_HOST        1: this host runs the rendezvous store, 0: it does not (default: 1 when
#                       RDZV_ENDPOINT's host is one of this machine's addresses)
#   RDZV_WAIT_S         seconds a host that is not the store host waits for the store to accept
#                       connections before it stops with an error (default 30)
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
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_WAIT_S="${RDZV_WAIT_S:-30}"
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ && "$RDZV_WAIT_S" =~ ^[0-9]+$ ]]; then
    echo "multinode.sh: MAX_RESTARTS and RDZV_WAIT_S must be whole numbers," \
        "got MAX_RESTARTS='$MAX_RESTARTS' RDZV_WAIT_S='$RDZV_WAIT_S'" >&2
    exit 2
fi
if [[ -n "${RDZV_IS_HOST:-}" && "$RDZV_IS_HOST" != 0 && "$RDZV_IS_HOST" != 1 ]]; then
    echo "multinode.sh: RDZV_IS_HOST must be 0 or 1, got '$RDZV_IS_HOST'" >&2
    exit 2
fi

topology=("$python" -m qatdist.topology)
# A wrong interface name would otherwise surface only after the rendezvous, as gloo's
# "Unable to find address for" in every worker.
if [[ -n "${GLOO_SOCKET_IFNAME:-}" ]]; then
    "${topology[@]}" --check-gloo-ifname >/dev/null || exit 2
fi
rdzv_host="${RDZV_ENDPOINT%:*}"
if [[ -z "${LOCAL_ADDR:-}" || -z "${GLOO_SOCKET_IFNAME:-}" || -z "${RDZV_IS_HOST:-}" ]]; then
    # With several hosts a loopback route is an error: the others could not reach this one.
    other_hosts=()
    (( NNODES > 1 )) && other_hosts=(--other-hosts)
    route="$("${topology[@]}" --route-to "$rdzv_host" "${other_hosts[@]}")" || {
        echo "multinode.sh: cannot choose this host's address for RDZV_ENDPOINT=$RDZV_ENDPOINT" \
            "(set LOCAL_ADDR, GLOO_SOCKET_IFNAME and RDZV_IS_HOST to choose it yourself)" >&2
        exit 2
    }
    read -r route_addr route_ifname route_is_local <<<"$route"
    LOCAL_ADDR="${LOCAL_ADDR:-$route_addr}"
    GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$route_ifname}"
    RDZV_IS_HOST="${RDZV_IS_HOST:-$route_is_local}"
fi
export GLOO_SOCKET_IFNAME  # the workers' gloo reads it
echo "multinode.sh: node $NODE_RANK: address $LOCAL_ADDR, gloo interface $GLOO_SOCKET_IFNAME," \
    "$( (( RDZV_IS_HOST )) && echo "hosts" || echo "joins") the rendezvous store at" \
    "$RDZV_ENDPOINT" >&2

# Without this, a host whose store host is unreachable retries for minutes inside torchrun
# before a RendezvousConnectionError that does not say which address it tried.
if (( ! RDZV_IS_HOST )); then
    "${topology[@]}" --wait-for "$RDZV_ENDPOINT" --wait-s "$RDZV_WAIT_S" || {
        echo "multinode.sh: is node 0 (the host of RDZV_ENDPOINT) started, and the port open" \
            "between the hosts? (RDZV_WAIT_S=$RDZV_WAIT_S)" >&2
        exit 2
    }
fi

if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$python" -m qatdist.topology --count-nodes)"
fi
RDZV_ID="${RDZV_ID:-qatdist-${RDZV_ENDPOINT##*:}}"

exec "$torchrun" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC" \
    --max-restarts="$MAX_RESTARTS" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" \
    --rdzv_id="$RDZV_ID" \
    --rdzv_conf="is_host=$RDZV_IS_HOST" \
    --local_addr="$LOCAL_ADDR" \
    -m qatdist.train "$@"
