"""Placement planning: one `RankPlacement` per local rank over a `Topology` and the allowed CPUs.

Every allowed physical core is used, a rank stays on one socket (and one node when there are
enough ranks), and the loader workers get the last cores of their own rank's set.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter
from dataclasses import dataclass

from qatdist.topology.discover import Topology, discover, format_cpulist, parse_cpulist


@dataclass
class RankPlacement:
    """One local rank's share of the machine: its compute CPUs, loader CPUs and NUMA nodes."""

    rank: int  # local rank
    node: int  # primary NUMA node
    nodes: list[int]  # all NUMA nodes this rank's cores are on
    cpus: list[int]  # CPU ids for compute threads
    threads: int  # torch intra-op threads (= len(cpus) unless overridden)
    membind: list[int]  # NUMA nodes memory is bound to
    loader_cpus: list[int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _apportion(weights: list[int], n: int, caps: list[int]) -> list[int]:
    """Give each bucket one rank, then each further rank to the bucket with most cores per rank."""
    counts = [1] * len(weights)
    for _ in range(n - len(weights)):
        open_ = [i for i in range(len(weights)) if counts[i] < caps[i]]
        best = max(open_, key=lambda i: (weights[i] / (counts[i] + 1), -i))
        counts[best] += 1
    return counts


def _contiguous_groups(weights: list[int], r: int) -> list[list[int]]:
    """Split indices 0..len-1 into r contiguous non-empty groups minimising the largest sum."""
    m = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[g][j]: smallest max group sum splitting the first j items into g groups.
    best = [[inf] * (m + 1) for _ in range(r + 1)]
    cut = [[0] * (m + 1) for _ in range(r + 1)]
    best[0][0] = 0
    for g in range(1, r + 1):
        for j in range(g, m + 1):
            for i in range(g - 1, j):
                cost = max(best[g - 1][i], prefix[j] - prefix[i])
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    groups = []
    j = m
    for g in range(r, 0, -1):
        i = cut[g][j]
        groups.append(list(range(i, j)))
        j = i
    return groups[::-1]


def _split_evenly(items: list, r: int) -> list[list]:
    size, extra = divmod(len(items), r)
    out, start = [], 0
    for i in range(r):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _cores_by_node(topology: Topology, cpus: set[int], use_smt: bool) -> dict[int, list[list[int]]]:
    """NUMA node -> physical cores (each a list of the CPU ids to use) among `cpus`."""
    cores: dict[int, list[int]] = {}
    for cpu in sorted(cpus):
        cores.setdefault(topology.cpus[cpu].core, []).append(cpu)
    by_node: dict[int, list[list[int]]] = {}
    for threads in sorted(cores.values()):
        by_node.setdefault(topology.cpus[threads[0]].node, []).append(
            threads if use_smt else threads[:1]
        )
    return dict(sorted(by_node.items()))


def _auto_groups(topology: Topology, allowed: set[int], n: int, use_smt: bool) -> list[list]:
    by_node = _cores_by_node(topology, allowed, use_smt)
    total = sum(len(c) for c in by_node.values())
    if n > total:
        raise ValueError(
            f"{n} ranks requested but only {total} allowed physical cores "
            f"(allowed CPUs {format_cpulist(allowed)}); use at most {total} ranks"
        )
    nodes = list(by_node)
    if n >= len(nodes):
        # Every node gets at least one rank; its cores are split evenly between its ranks.
        sizes = [len(by_node[x]) for x in nodes]
        groups = []
        for node, r in zip(nodes, _apportion(sizes, n, caps=sizes)):
            groups.extend(_split_evenly(by_node[node], r))
        return groups

    # Fewer ranks than nodes: each rank takes whole nodes, all on one socket when possible.
    sockets: dict[int, list[int]] = {}
    for node in nodes:
        sockets.setdefault(topology.cpus[by_node[node][0][0]].socket, []).append(node)
    socket_nodes = [sockets[s] for s in sorted(sockets)]
    weights = [sum(len(by_node[x]) for x in sn) for sn in socket_nodes]
    if n < len(socket_nodes):
        # Spanning sockets is unavoidable: merge neighbouring sockets, balancing core counts.
        node_groups = [
            [x for i in idx for x in socket_nodes[i]] for idx in _contiguous_groups(weights, n)
        ]
    else:
        counts = _apportion(weights, n, caps=[len(sn) for sn in socket_nodes])
        node_groups = []
        for sn, r in zip(socket_nodes, counts):
            sizes = [len(by_node[x]) for x in sn]
            node_groups.extend([sn[i] for i in idx] for idx in _contiguous_groups(sizes, r))
    return [[core for x in group for core in by_node[x]] for group in node_groups]


def _explicit_groups(topology: Topology, allowed: set[int], n: int, text: str) -> list[list]:
    parts = [p.strip() for p in text.split(";")]
    if len(parts) != n:
        raise ValueError(
            f"explicit core list {text!r} names {len(parts)} ranks but nproc_per_node is {n}"
        )
    owner: dict[int, int] = {}
    groups = []
    for rank, part in enumerate(parts):
        try:
            cpus = parse_cpulist(part)
        except ValueError as e:
            raise ValueError(f"explicit core list, rank {rank}: {e}") from None
        if not cpus:
            raise ValueError(f"explicit core list {text!r}: rank {rank} has no CPUs")
        for cpu in cpus:
            if cpu in owner:
                raise ValueError(
                    f"explicit core lists overlap: CPU {cpu} is given to ranks {owner[cpu]} "
                    f"and {rank}"
                )
            owner[cpu] = rank
        outside = sorted(set(cpus) - allowed)
        if outside:
            raise ValueError(
                f"explicit core list, rank {rank}: CPUs {format_cpulist(outside)} are not allowed "
                f"for this process (allowed: {format_cpulist(allowed)})"
            )
        by_node = _cores_by_node(topology, set(cpus), use_smt=True)
        groups.append(sorted(core for cores in by_node.values() for core in cores))
    return groups


# Loader cores are dedicated (taken out of the compute set) only when they are at most a quarter
# of the rank's physical cores.
LOADER_SHARE_BELOW = 4


def _placement(
    rank: int, cores: list[list[int]], topology: Topology, loader_cores: int, threads: int
) -> RankPlacement:
    if loader_cores == 0:
        compute, loader = cores, cores
    elif len(cores) < LOADER_SHARE_BELOW * loader_cores:
        # A small rank would lose too much compute to dedicated loader cores (a 2-core rank
        # would train on one thread): the loader shares the rank's last cores instead.
        compute, loader = cores, cores[-min(loader_cores, len(cores)) :]
    else:
        compute, loader = cores[:-loader_cores], cores[-loader_cores:]
    cpus = sorted(c for core in compute for c in core)
    loader_cpus = sorted(c for core in loader for c in core)
    node_counts = Counter(topology.cpus[c].node for c in cpus)
    primary = max(node_counts, key=lambda x: (node_counts[x], -x))
    nodes = sorted({topology.cpus[c].node for c in cpus + loader_cpus})
    return RankPlacement(
        rank=rank,
        node=primary,
        nodes=nodes,
        cpus=cpus,
        threads=threads or len(cpus),
        membind=list(nodes),
        loader_cpus=loader_cpus,
    )


def plan(
    topology: Topology,
    nproc_per_node: int,
    allowed_cpus: set[int] | None = None,
    use_smt: bool = False,
    loader_cores: int = 1,
    explicit_cores: str = "",
    threads: int = 0,
) -> list[RankPlacement]:
    """Place `nproc_per_node` local ranks on the allowed CPUs of `topology`.

    `allowed_cpus` defaults to every CPU of the topology. Each rank's last `loader_cores` physical
    cores become its `loader_cpus`: dedicated to the loader when that leaves the rank at least
    three quarters of its cores, shared with compute otherwise (0: the loader shares the whole
    compute set). `explicit_cores` ("0-27;28-55") overrides the automatic split. `threads` > 0
    overrides the torch thread count. Raises ValueError for requests that cannot be met.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
    if loader_cores < 0:
        raise ValueError(f"loader_cores must be >= 0, got {loader_cores}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: one per CPU), got {threads}")
    known = set(topology.cpus)
    if allowed_cpus is None:
        allowed = known
    else:
        allowed = set(allowed_cpus) & known
        unknown = set(allowed_cpus) - known
        if unknown:
            warnings.warn(
                f"qatdist.topology: allowed CPUs {format_cpulist(unknown)} are not in the "
                f"topology read from {topology.source!r}; they are left out",
                stacklevel=2,
            )
    if not allowed:
        raise ValueError(
            f"none of the allowed CPUs ({format_cpulist(allowed_cpus or [])}) is in the "
            f"topology (CPUs {format_cpulist(known)})"
        )
    if explicit_cores.strip():
        groups = _explicit_groups(topology, allowed, nproc_per_node, explicit_cores)
    else:
        groups = _auto_groups(topology, allowed, nproc_per_node, use_smt)
    return [_placement(r, g, topology, loader_cores, threads) for r, g in enumerate(groups)]


def local_placement(
    local_rank: int,
    local_world_size: int,
    *,
    sysfs_root: str = "/sys",
    use_smt: bool = False,
    loader_cores: int = 1,
    explicit_cores: str = "",
    threads: int = 0,
) -> RankPlacement:
    """Plan all local ranks over this process's allowed CPUs and return `local_rank`'s entry.

    Call it before `apply()`: afterwards the process's allowed set is only its own rank's CPUs.
    """
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank {local_rank} is outside 0..{local_world_size - 1}")
    placements = plan(
        discover(sysfs_root),
        local_world_size,
        allowed_cpus=set(os.sched_getaffinity(0)),
        use_smt=use_smt,
        loader_cores=loader_cores,
        explicit_cores=explicit_cores,
        threads=threads,
    )
    return placements[local_rank]


def node_cpus(
    placement: RankPlacement, *, sysfs_root: str = "/sys", use_smt: bool = False
) -> list[int]:
    """The allowed CPUs of `placement`'s NUMA nodes (one per physical core unless `use_smt`):
    where rank 0 runs its final compile and benchmark once the other ranks are done. Call it
    before `apply()` narrows the allowed set."""
    topo = discover(sysfs_root)
    allowed = os.sched_getaffinity(0)
    return sorted(
        cpu.id
        for cpu in topo.cpus.values()
        if cpu.id in allowed and cpu.node in placement.nodes and (use_smt or cpu.core == cpu.id)
    )
