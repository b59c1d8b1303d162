#!/usr/bin/env bash
# Train on this machine, one rank per NUMA node that has CPUs this shell may use.
#
# Usage: launch/local.sh [--config FILE] [--section.key=value ...]
#   NPROC=4 launch/local.sh ...   # override the rank count
# Arguments are passed to `python -m qatdist.train`. torchrun --standalone rendezvouses on
# loopback with a free port, so nothing is exposed on the network. Each rank pins itself to the
# cores `python -m qatdist.topology --nproc-per-node $NPROC` prints.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/torchrun" ]]; then
    torchrun="$repo/.venv/bin/torchrun"
    python="$repo/.venv/bin/python"
else
    torchrun="$(command -v torchrun)" || { echo "local.sh: torchrun not found" >&2; exit 1; }
    python="$(command -v python3)"
fi

if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$python" -m qatdist.topology --count-nodes)"
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi

exec "$torchrun" --standalone --nproc_per_node="$NPROC" -m qatdist.train "$@"
