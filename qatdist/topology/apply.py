"""Applying a placement: pin the process, bind its memory through libnuma, set thread counts.

`place_this_rank` is what every training rank calls before its process group starts;
`widen` re-pins rank 0 to its whole node for the final compile and benchmark, and
`pin_loader_worker` is the DataLoader workers' `worker_init_fn`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qatdist.topology.discover import format_cpulist, parse_cpulist
from qatdist.topology.plan import RankPlacement, local_placement, node_cpus

if TYPE_CHECKING:  # qatdist.distributed loads torch; the planning CLI must start without it
    from qatdist.config import RuntimeConfig
    from qatdist.distributed import DistEnv

_MPOL_BIND = 2


@dataclass
class AppliedSteps:
    """Which parts of a placement `apply` managed to set."""

    affinity: bool = False  # every thread pinned to the placement's cpus
    membind: bool = False  # memory bound to the placement's NUMA nodes
    omp_env: bool = False  # OMP_NUM_THREADS set, conflicting CPU lists removed
    torch_threads: bool = False  # torch.set_num_threads succeeded


@dataclass
class AppliedPlacement:
    """What `apply` did for one rank, and what the kernel and torch report afterwards."""

    placement: RankPlacement
    pinning: bool  # pinning was asked for; False: only the thread count was set
    applied: AppliedSteps
    membind_status: str  # "bound", or why memory is not bound
    omp_num_threads: str | None  # OMP_NUM_THREADS after apply
    removed_env: list[str]  # conflicting affinity variables removed, as NAME=value
    warnings: list[str]
    kernel_cpus: list[int]  # Cpus_allowed_list of this process after apply
    kernel_mems: list[int]  # Mems_allowed_list of this process after apply
    torch_threads: int  # torch.get_num_threads() after apply
    # The allowed CPUs of the rank's NUMA node(s), read before pinning by `place_this_rank`
    # (empty from `apply` alone): where rank 0 runs the final compile and benchmark.
    node_cpus: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON record written to topology.json (its key names are a contract)."""
        return {
            "placement": self.placement.to_dict(),
            "pinning": "on" if self.pinning else "off",
            "applied": dataclasses.asdict(self.applied),
            "membind_status": self.membind_status,
            "env": {"OMP_NUM_THREADS": self.omp_num_threads, "removed": list(self.removed_env)},
            "warnings": list(self.warnings),
            "kernel_cpus_allowed_list": format_cpulist(self.kernel_cpus),
            "kernel_mems_allowed_list": format_cpulist(self.kernel_mems),
            "torch_threads": self.torch_threads,
            "node_cpus": list(self.node_cpus),
        }


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


def apply(placement: RankPlacement, *, pin: bool = True) -> AppliedPlacement:
    """Pin this process to `placement.cpus`, bind its memory to `placement.membind` and set the
    torch thread count; with pin=False only the thread count is set.

    Call it first thing in the rank, before torch runs any op: memory policy is per thread and
    only inherited by threads created later. Failures become warnings, never exceptions.
    Returns the plan, what was applied and what the kernel reports afterwards.
    """
    import torch  # imported here so the planning CLI starts without loading torch

    notes: list[str] = []

    def warn(msg: str) -> None:
        notes.append(msg)
        warnings.warn(f"qatdist.topology: {msg}", stacklevel=3)

    applied = AppliedSteps()
    membind_status = "not bound: pinning off"
    env_removed: list[str] = []
    if pin:
        try:
            _pin_all_threads(placement.cpus)
            applied.affinity = True
        except (OSError, ValueError) as e:
            cpus = format_cpulist(placement.cpus)
            warn(f"could not pin rank {placement.rank} to CPUs {cpus}: {e}")
        env_removed = _fix_openmp_env(placement.threads)
        applied.omp_env = True
        for entry in env_removed:
            warn(f"removed {entry}: qatdist pins each rank itself")
        try:
            applied.membind, membind_status = _bind_memory(placement.membind)
        except (OSError, AttributeError) as e:
            membind_status = f"not bound: {e}"
        if not applied.membind:
            warn(f"memory of rank {placement.rank} not bound to NUMA nodes: {membind_status}")
    try:
        torch.set_num_threads(placement.threads)
        applied.torch_threads = True
    except (RuntimeError, ValueError) as e:
        warn(f"torch.set_num_threads({placement.threads}) failed: {e}")
    status = _proc_status()
    return AppliedPlacement(
        placement=placement,
        pinning=pin,
        applied=applied,
        membind_status=membind_status,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        removed_env=env_removed,
        warnings=notes,
        kernel_cpus=parse_cpulist(status.get("Cpus_allowed_list", "")),
        kernel_mems=parse_cpulist(status.get("Mems_allowed_list", "")),
        torch_threads=torch.get_num_threads(),
    )


def place_this_rank(cfg: RuntimeConfig, env: DistEnv) -> AppliedPlacement:
    """Pin this rank to its share of the node (or, with `runtime.pinning = "off"`, only set its
    thread count). Runs before the process group starts so gloo's threads and memory land on
    the rank's node. Returns what `apply` recorded, with `node_cpus` filled in."""
    placement = local_placement(
        env.local_rank,
        env.local_world_size,
        use_smt=cfg.use_smt,
        loader_cores=cfg.loader_cores,
        explicit_cores=cfg.cores,
        threads=cfg.threads,
    )
    # Read before `apply`, which narrows the allowed set to the rank's own CPUs.
    cpus_of_nodes = node_cpus(placement, use_smt=cfg.use_smt)
    applied = apply(placement, pin=cfg.pinning == "auto")
    applied.node_cpus = cpus_of_nodes
    return applied


def widen(cpus: list[int]) -> None:
    """Re-pin every thread of this process to `cpus` and use one torch thread per CPU."""
    import torch

    _pin_all_threads(cpus)
    torch.set_num_threads(len(cpus))
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))


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
