"""NUMA-aware placement of local ranks: discover CPU topology, plan per-rank CPU sets, apply them.

`discover()` reads NUMA nodes, sockets and SMT siblings from sysfs. `plan()` turns a topology, the
process's allowed CPUs and a rank count into one `RankPlacement` per local rank: every allowed
physical core is used, a rank stays on one socket (and one node when there are enough ranks), and
the loader workers get the last cores of their own rank's set. `apply()` pins the calling process,
binds its memory through libnuma and sets the torch thread count.

`python -m qatdist.topology --nproc-per-node N` prints the plan as JSON (see `--help`).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_CPULIST_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")
_MPOL_BIND = 2
_MAX_CPU = 1 << 16  # far above Linux's NR_CPUS; bounds what a garbled cpulist can allocate


def parse_cpulist(text: str) -> list[int]:
    """Parse Linux cpulist syntax ("0-3,8,10-11", also "0-15:2/4") into sorted unique CPU ids.

    Raises ValueError naming the bad item.
    """
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for item in text.split(","):
        item = item.strip()
        m = _CPULIST_ITEM.match(item)
        if not m:
            raise ValueError(f"invalid CPU list {text!r}: cannot parse {item!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ValueError(f"invalid CPU list {text!r}: range {item!r} runs backwards")
        if last >= _MAX_CPU:
            raise ValueError(f"invalid CPU list {text!r}: CPU {last} is beyond {_MAX_CPU - 1}")
        used, group = (int(m.group(3)), int(m.group(4))) if m.group(3) else (1, 1)
        if used < 1 or group < used:
            raise ValueError(f"invalid CPU list {text!r}: bad stride in {item!r}")
        cpus.update(c for c in range(first, last + 1) if (c - first) % group < used)
    return sorted(cpus)


def format_cpulist(cpus) -> str:
    """Format CPU ids as a Linux cpulist: [0, 1, 2, 3, 8] -> "0-3,8"."""
    ids = sorted(set(cpus))
    parts = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Cpu:
    id: int
    node: int
    socket: int
    core: int  # smallest CPU id among this CPU's SMT siblings: one key per physical core


@dataclass
class Topology:
    """What `discover` found: every CPU with its NUMA node, socket and physical core."""

    cpus: dict[int, Cpu]
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> dict[int, list[int]]:
        """NUMA node -> its CPU ids."""
        out: dict[int, list[int]] = {}
        for cpu in sorted(self.cpus):
            out.setdefault(self.cpus[cpu].node, []).append(cpu)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "nodes": {n: format_cpulist(c) for n, c in self.nodes.items()},
            "sockets": sorted({c.socket for c in self.cpus.values()}),
            "physical_cores": len({c.core for c in self.cpus.values()}),
            "warnings": list(self.warnings),
        }


@dataclass
class RankPlacement:
    rank: int  # local rank
    node: int  # primary NUMA node
    nodes: list[int]  # all NUMA nodes this rank's cores are on
    cpus: list[int]  # CPU ids for compute threads
    threads: int  # torch intra-op threads (= len(cpus) unless overridden)
    membind: list[int]  # NUMA nodes memory is bound to
    loader_cpus: list[int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _fallback_cpus() -> set[int]:
    return set(range(os.cpu_count() or 1)) | set(os.sched_getaffinity(0))


def _online_cpus(cpu_dir: Path, problems: list[str]) -> set[int] | None:
    """CPU ids with a cpuN directory, restricted to the `online` list when it is readable."""
    consequence = "each NUMA node is taken as a socket and each CPU as a physical core"
    try:
        ids = {int(p.name[3:]) for p in cpu_dir.iterdir() if re.fullmatch(r"cpu\d+", p.name)}
    except FileNotFoundError:
        problems.append(f"{cpu_dir} does not exist; {consequence}")
        return None
    except OSError as e:
        problems.append(f"cannot list {cpu_dir}: {e}; {consequence}")
        return None
    online_file = cpu_dir / "online"
    try:
        ids &= set(parse_cpulist(_read(online_file)))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        problems.append(f"cannot use {online_file}: {e}")
    if not ids:
        problems.append(f"no online cpuN directories under {cpu_dir}; {consequence}")
        return None
    return ids


def _read_nodes(node_dir: Path, problems: list[str]) -> dict[int, list[int]] | None:
    """NUMA node -> CPU ids, or None (with the reason in `problems`) when sysfs looks wrong."""
    try:
        entries = [p for p in node_dir.iterdir() if re.fullmatch(r"node\d+", p.name)]
    except OSError as e:
        problems.append(f"cannot list NUMA nodes in {node_dir}: {e}")
        return None
    if not entries:
        problems.append(f"no nodeN directories in {node_dir}")
        return None
    nodes: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    for entry in sorted(entries, key=lambda p: int(p.name[4:])):
        node = int(entry.name[4:])
        path = entry / "cpulist"
        try:
            cpus = parse_cpulist(_read(path))
        except OSError as e:
            problems.append(f"cannot read {path}: {e}")
            return None
        except ValueError as e:
            problems.append(f"garbage in {path}: {e}")
            return None
        for cpu in cpus:
            if cpu in owner:
                problems.append(f"CPU {cpu} is listed in both node{owner[cpu]} and node{node}")
                return None
            owner[cpu] = node
        nodes[node] = cpus
    if not owner:
        problems.append(f"every cpulist under {node_dir} is empty")
        return None
    return nodes


def _read_int(path: Path) -> int:
    return int(_read(path))


def _read_cores(
    cpu_dir: Path, node_of: dict[int, int], problems: list[str]
) -> tuple[dict[int, int], dict[int, int]]:
    """Socket of each CPU, and its physical core as the smallest CPU id among its siblings."""
    bad_socket: list[tuple[int, str]] = []
    bad_core: list[tuple[int, str]] = []
    socket_of: dict[int, int] = {}
    # Union-find over "same physical core" evidence; a core never spans NUMA nodes.
    parent = {cpu: cpu for cpu in node_of}

    def find(cpu: int) -> int:
        while parent[cpu] != cpu:
            parent[cpu] = parent[parent[cpu]]
            cpu = parent[cpu]
        return cpu

    def union(a: int, b: int) -> None:
        if b in node_of and node_of[a] == node_of[b]:
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)

    by_core_id: dict[tuple[int, int, int], int] = {}
    for cpu in sorted(node_of):
        tdir = cpu_dir / f"cpu{cpu}" / "topology"
        try:
            socket_of[cpu] = _read_int(tdir / "physical_package_id")
        except (OSError, ValueError) as e:
            bad_socket.append((cpu, str(e)))
        siblings = None
        for name in ("thread_siblings_list", "core_cpus_list"):
            try:
                siblings = parse_cpulist(_read(tdir / name))
            except (OSError, ValueError):
                continue
            if cpu in siblings:
                break
            siblings = None
        if siblings is not None:
            for other in siblings:
                union(cpu, other)
            continue
        try:
            key = (node_of[cpu], socket_of[cpu], _read_int(tdir / "core_id"))
            union(cpu, by_core_id.setdefault(key, cpu))
        except (KeyError, OSError, ValueError) as e:
            bad_core.append((cpu, str(e) if not isinstance(e, KeyError) else "no package id"))

    if bad_socket:
        cpus = [c for c, _ in bad_socket]
        problems.append(
            f"no usable physical_package_id for CPUs {format_cpulist(cpus)} "
            f"({bad_socket[0][1]}); treating each NUMA node as its own socket"
        )
        socket_of = dict(node_of)
    if bad_core:
        cpus = [c for c, _ in bad_core]
        problems.append(
            f"no usable thread_siblings_list/core_cpus_list/core_id for CPUs "
            f"{format_cpulist(cpus)} ({bad_core[0][1]}); treating each as its own physical "
            "core unless a sibling lists it"
        )

    return socket_of, {cpu: find(cpu) for cpu in node_of}


def discover(sysfs_root: str = "/sys") -> Topology:
    """Read NUMA nodes, sockets and SMT siblings from `<sysfs_root>/devices/system`.

    Never raises for bad sysfs: missing or garbled files produce a warning (naming the file) and
    a coarser topology, down to one node holding every CPU from os.cpu_count()/the allowed set.
    """
    root = Path(sysfs_root)
    cpu_dir = root / "devices" / "system" / "cpu"
    node_dir = root / "devices" / "system" / "node"
    problems: list[str] = []

    online = _online_cpus(cpu_dir, problems)
    nodes = _read_nodes(node_dir, problems)
    if nodes is None:
        cpus = online if online is not None else _fallback_cpus()
        problems.append(f"treating CPUs {format_cpulist(cpus)} as a single NUMA node 0")
        nodes = {0: sorted(cpus)}
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}

    if online is None:
        # No cpuN directories to read: every node is a socket and every CPU a core.
        socket_of, core_of = dict(node_of), {cpu: cpu for cpu in node_of}
    else:
        socket_of, core_of = _read_cores(cpu_dir, node_of, problems)

    topo = Topology(
        cpus={cpu: Cpu(cpu, node_of[cpu], socket_of[cpu], core_of[cpu]) for cpu in sorted(node_of)},
        source=str(root),
        warnings=problems,
    )
    for problem in problems:
        warnings.warn(f"qatdist.topology: {problem}", stacklevel=2)
    return topo


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


def _proc_status() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    except OSError:
        pass
    return out


def _pin_all_threads(cpus: list[int]) -> None:
    """Pin every thread of the process: sched_setaffinity(0) alone only moves the caller."""
    os.sched_setaffinity(0, cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # the thread exited meanwhile


def _load_libnuma() -> tuple[ctypes.CDLL | None, str]:
    """libnuma and "", or None and why it could not be loaded."""
    reasons = []
    for name in ("libnuma.so.1", ctypes.util.find_library("numa")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True), ""
        except OSError as e:
            reasons.append(str(e))
    return None, "; ".join(reasons) or "libnuma.so.1 not found"


def _bind_memory(nodes: list[int]) -> tuple[bool, str]:
    """Set an MPOL_BIND policy on `nodes` for the calling thread (inherited by new threads)."""
    if not nodes:
        return False, "not bound: the placement names no NUMA nodes"
    lib, reason = _load_libnuma()
    if lib is None:
        return False, f"libnuma unavailable: {reason}"
    if lib.numa_available() < 0:
        return False, "libnuma unavailable: numa_available() returned -1 (no NUMA in this kernel)"
    mems = _proc_status().get("Mems_allowed_list", "")
    try:
        outside = sorted(set(nodes) - set(parse_cpulist(mems))) if mems else []
    except ValueError:
        outside = []
    if outside:
        return False, (
            f"not bound: nodes {format_cpulist(outside)} are outside this process's "
            f"Mems_allowed_list {mems}"
        )
    lib.numa_parse_nodestring.restype = ctypes.c_void_p
    lib.numa_parse_nodestring.argtypes = [ctypes.c_char_p]
    lib.numa_set_membind.argtypes = [ctypes.c_void_p]
    lib.numa_set_membind.restype = None
    lib.numa_bitmask_free.argtypes = [ctypes.c_void_p]
    lib.numa_bitmask_free.restype = None
    lib.get_mempolicy.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_uint,
    ]
    nodestring = format_cpulist(nodes)
    mask = lib.numa_parse_nodestring(nodestring.encode())
    if not mask:
        return False, f"not bound: numa_parse_nodestring rejected {nodestring!r}"
    try:
        ctypes.set_errno(0)
        lib.numa_set_membind(mask)
        err = ctypes.get_errno()
    finally:
        lib.numa_bitmask_free(mask)
    mode = ctypes.c_int(-1)
    if lib.get_mempolicy(ctypes.byref(mode), None, 0, None, 0) != 0 or mode.value != _MPOL_BIND:
        detail = os.strerror(err) if err else f"policy mode is {mode.value}"
        return False, f"not bound: numa_set_membind({nodestring!r}) failed: {detail}"
    return True, "bound"


def _fix_openmp_env(threads: int) -> list[str]:
    """Make the OpenMP environment (inherited by child processes) agree with the pinning."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    removed = []
    # Explicit CPU lists would bind every rank's threads to the same CPUs, possibly outside
    # its own set; relative policies (KMP_AFFINITY=compact, OMP_PROC_BIND) follow the mask.
    if "GOMP_CPU_AFFINITY" in os.environ:
        removed.append(f"GOMP_CPU_AFFINITY={os.environ.pop('GOMP_CPU_AFFINITY')}")
    if "proclist" in os.environ.get("KMP_AFFINITY", ""):
        removed.append(f"KMP_AFFINITY={os.environ.pop('KMP_AFFINITY')}")
    return removed


def apply(placement: RankPlacement, *, pin: bool = True) -> dict:
    """Pin this process to `placement.cpus`, bind its memory to `placement.membind` and set the
    torch thread count; with pin=False only the thread count is set.

    Call it first thing in the rank, before torch runs any op: memory policy is per thread and
    only inherited by threads created later. Failures become warnings, never exceptions.
    Returns a JSON-able record of the plan, what was applied and what the kernel reports.
    """
    import torch  # imported here so the planning CLI starts without loading torch

    notes: list[str] = []

    def warn(msg: str) -> None:
        notes.append(msg)
        warnings.warn(f"qatdist.topology: {msg}", stacklevel=3)

    applied = {"affinity": False, "membind": False, "omp_env": False, "torch_threads": False}
    membind_status = "not bound: pinning off"
    env_removed: list[str] = []
    if pin:
        try:
            _pin_all_threads(placement.cpus)
            applied["affinity"] = True
        except (OSError, ValueError) as e:
            cpus = format_cpulist(placement.cpus)
            warn(f"could not pin rank {placement.rank} to CPUs {cpus}: {e}")
        env_removed = _fix_openmp_env(placement.threads)
        applied["omp_env"] = True
        for entry in env_removed:
            warn(f"removed {entry}: qatdist pins each rank itself")
        try:
            applied["membind"], membind_status = _bind_memory(placement.membind)
        except (OSError, AttributeError) as e:
            membind_status = f"not bound: {e}"
        if not applied["membind"]:
            warn(f"memory of rank {placement.rank} not bound to NUMA nodes: {membind_status}")
    try:
        torch.set_num_threads(placement.threads)
        applied["torch_threads"] = True
    except (RuntimeError, ValueError) as e:
        warn(f"torch.set_num_threads({placement.threads}) failed: {e}")
    status = _proc_status()
    return {
        "placement": placement.to_dict(),
        "pinning": "on" if pin else "off",
        "applied": applied,
        "membind_status": membind_status,
        "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "removed": env_removed},
        "warnings": notes,
        "kernel_cpus_allowed_list": status.get("Cpus_allowed_list", ""),
        "kernel_mems_allowed_list": status.get("Mems_allowed_list", ""),
        "torch_threads": torch.get_num_threads(),
    }


def pin_loader_worker(cpus: list[int], worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: pin the worker to its rank's loader CPUs, one torch thread.

    `worker_id` is accepted so `functools.partial(pin_loader_worker, cpus)` works as-is.
    """
    import torch  # a worker was forked from a rank that already imported torch

    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:
            warnings.warn(
                f"qatdist.topology: loader worker {worker_id} not pinned to "
                f"{format_cpulist(cpus)}: {e}",
                stacklevel=2,
            )
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _cpulist_arg(text: str) -> list[int]:
    try:
        cpus = parse_cpulist(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not cpus:
        raise argparse.ArgumentTypeError("the CPU list is empty")
    return cpus


def _int_arg(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qatdist.topology",
        description="Print the NUMA placement qatdist would use for the local ranks of this "
        "machine, as JSON: one object per local rank (rank, node, nodes, cpus, threads, membind, "
        "loader_cpus).",
    )
    p.add_argument(
        "--sysfs-root",
        metavar="DIR",
        default=None,
        help="Read the topology from DIR/devices/system instead of /sys (e.g. a copied tree). "
        "Without --allowed-cpus, every CPU of that tree then counts as allowed.",
    )
    p.add_argument(
        "--allowed-cpus",
        metavar="LIST",
        type=_cpulist_arg,
        default=None,
        help="CPUs the ranks may use, Linux cpulist syntax (e.g. '0-13,28-41'). Default: this "
        "process's affinity (taskset/cgroup), or every CPU of --sysfs-root.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--nproc-per-node",
        metavar="N",
        type=_int_arg(1),
        help="Number of local ranks to place (torchrun's --nproc_per_node).",
    )
    mode.add_argument(
        "--count-nodes",
        action="store_true",
        help="Print only the number of NUMA nodes that have allowed CPUs (launch/local.sh's "
        "default rank count) and exit.",
    )
    p.add_argument(
        "--use-smt",
        action="store_true",
        help="Also give ranks the SMT sibling threads of their cores (runtime.use_smt).",
    )
    p.add_argument(
        "--loader-cores",
        metavar="K",
        type=_int_arg(0),
        default=1,
        help="Physical cores taken from the end of each rank's set for its DataLoader workers; "
        "a one-core rank shares its core; 0 = workers share the compute CPUs "
        "(runtime.loader_cores, default 1).",
    )
    p.add_argument(
        "--cores",
        metavar="LISTS",
        default="",
        help="Explicit CPUs per rank, ';' between ranks, cpulist syntax inside, e.g. "
        "'0-27;28-55' (runtime.cores). Overrides the automatic plan.",
    )
    p.add_argument(
        "--threads",
        metavar="T",
        type=_int_arg(0),
        default=0,
        help="Torch intra-op threads per rank; 0 = one per compute CPU (runtime.threads).",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    if args.sysfs_root is None:
        topo = discover()
        allowed = args.allowed_cpus or sorted(os.sched_getaffinity(0))
    else:
        topo = discover(args.sysfs_root)
        allowed = args.allowed_cpus
    try:
        if args.count_nodes:
            usable = set(topo.cpus) if allowed is None else set(allowed)
            print(sum(1 for cpus in topo.nodes.values() if usable & set(cpus)))
            return 0
        placements = plan(
            topo,
            args.nproc_per_node,
            allowed_cpus=None if allowed is None else set(allowed),
            use_smt=args.use_smt,
            loader_cores=args.loader_cores,
            explicit_cores=args.cores,
            threads=args.threads,
        )
    except ValueError as e:
        parser.error(str(e))
    # One rank per line: valid JSON that stays readable with a hundred CPUs per rank.
    print("[\n" + ",\n".join(json.dumps(p.to_dict()) for p in placements) + "\n]")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def node_cpus(placement: RankPlacement, *, sysfs_root: str = "/sys", use_smt: bool = False):
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


def widen(cpus: list[int]) -> None:
    """Re-pin every thread of this process to `cpus` and use one torch thread per CPU."""
    import torch

    _pin_all_threads(cpus)
    torch.set_num_threads(len(cpus))
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))
