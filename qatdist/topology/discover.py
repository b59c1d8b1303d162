"""What the machine has: CPUs with their NUMA node, socket and physical core (from sysfs), and
the CPU's int8 instructions (from /proc/cpuinfo and torch).

`discover()` never raises for a bad sysfs tree: it warns, naming the file, and falls back to a
coarser topology.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_CPULIST_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")
_MAX_CPU = 1 << 16  # far above Linux's NR_CPUS; bounds what a garbled cpulist can allocate

log = logging.getLogger("qatdist.topology")


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


def format_cpulist(cpus: Iterable[int]) -> str:
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


# /proc/cpuinfo flags that give int8 dot products (what oneDNN's int8 convolutions and matmuls
# are fast with), and the related bf16 flag worth recording beside them.
INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
RECORDED_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_bf16")
# oneDNN dispatches no ISA above ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) when set:
# these caps leave it without int8 dot products whatever the CPU has.
ONEDNN_ISAS_WITHOUT_INT8_DOT_PRODUCT = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def onednn_max_cpu_isa() -> str | None:
    """The ISA cap oneDNN reads from the environment (upper case), None when not set."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if value := os.environ.get(variable):
            return value.upper()
    return None


def cpu_int8_capabilities(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """The CPU's int8-relevant instruction sets, as a JSON-able dict.

    Keys: `torch_cpu_capability` (`torch.backends.cpu.get_cpu_capability()`, e.g. "AVX512"),
    `cpu_model` ("model name" of the first processor), one bool per flag of
    `RECORDED_CPU_FLAGS` (set only when every processor listed has it), `onednn_max_cpu_isa`
    (`onednn_max_cpu_isa()`), and `int8_dot_product`: any of `INT8_DOT_PRODUCT_FLAGS`, unless
    that cap keeps oneDNN's kernels below them. Raises OSError when `cpuinfo_path` cannot be
    read and ValueError when it has no "flags" line.
    """
    import torch  # here so the planning CLI starts without loading torch

    text = Path(cpuinfo_path).read_text()
    flag_sets: list[set[str]] = []
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags":
            flag_sets.append(set(value.split()))
        elif key == "model name" and not model:
            model = value.strip()
    if not flag_sets:
        raise ValueError(f"no 'flags' line in {cpuinfo_path}: cannot tell the CPU's instructions")
    common = set.intersection(*flag_sets)
    caps: dict = {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": model,
    }
    caps.update({flag: flag in common for flag in RECORDED_CPU_FLAGS})
    caps["onednn_max_cpu_isa"] = onednn_max_cpu_isa()
    caps["int8_dot_product"] = any(caps[flag] for flag in INT8_DOT_PRODUCT_FLAGS) and (
        caps["onednn_max_cpu_isa"] not in ONEDNN_ISAS_WITHOUT_INT8_DOT_PRODUCT
    )
    return caps


def cpu_int8_preflight(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """`cpu_int8_capabilities()`, logging a warning when the CPU has no int8 dot-product
    instructions: the int8 model then runs on slower emulated paths and may lose to fp32, and
    oneDNN sums pairs of u8 x s8 products in saturating int16 there, so its outputs may differ
    from the converted model's by more than rounding."""
    caps = cpu_int8_capabilities(cpuinfo_path)
    if not caps["int8_dot_product"]:
        cap = caps["onednn_max_cpu_isa"]
        lacking = (
            f"oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)"
            if cap in ONEDNN_ISAS_WITHOUT_INT8_DOT_PRODUCT
            and any(caps[flag] for flag in INT8_DOT_PRODUCT_FLAGS)
            else f"none of {', '.join(INT8_DOT_PRODUCT_FLAGS)}"
        )
        log.warning(
            "this CPU (%s, torch capability %s) has %s: int8 convolutions and matmuls run "
            "without int8 dot-product instructions: they may be no faster than fp32, and their "
            "int16 partial sums saturate unless the weights are 7-bit (quant.target 'avx2', "
            "what 'auto' picks here)",
            caps["cpu_model"] or "model unknown",
            caps["torch_cpu_capability"],
            lacking,
        )
    return caps
