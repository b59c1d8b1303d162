"""NUMA-aware placement of local ranks: discover CPU topology, plan per-rank CPU sets, apply them.

- `discover` (sysfs reading): `discover()` reads NUMA nodes, sockets and SMT siblings into a
  `Topology`; `cpu_int8_capabilities()` says which int8 instructions the CPU has
  (`cpu_int8_preflight()` also warns when it has none).
- `plan`: `plan()` turns a topology, the process's allowed CPUs and a rank count into one
  `RankPlacement` per local rank; `local_placement()` plans this machine and picks one rank.
- `apply`: `apply()` pins the calling process, binds its memory through libnuma and sets the
  torch thread count, returning an `AppliedPlacement`; `place_this_rank()` does all of it for a
  training rank; `widen()` and `pin_loader_worker()` re-pin later.
- `cli`: `python -m qatdist.topology --nproc-per-node N` prints the plan as JSON, `--route-to
  HOST` the route (`qatdist.distributed.route`; see `--help`).
"""

from qatdist.topology.apply import (
    AppliedPlacement,
    AppliedSteps,
    apply,
    pin_loader_worker,
    place_this_rank,
    widen,
)
from qatdist.topology.discover import (
    INT8_DOT_PRODUCT_FLAGS,
    RECORDED_CPU_FLAGS,
    Cpu,
    Topology,
    cpu_int8_capabilities,
    cpu_int8_preflight,
    discover,
    format_cpulist,
    parse_cpulist,
)
from qatdist.topology.plan import (
    LOADER_SHARE_BELOW,
    RankPlacement,
    local_placement,
    node_cpus,
    plan,
)

__all__ = [
    "INT8_DOT_PRODUCT_FLAGS",
    "LOADER_SHARE_BELOW",
    "RECORDED_CPU_FLAGS",
    "AppliedPlacement",
    "AppliedSteps",
    "Cpu",
    "RankPlacement",
    "Topology",
    "apply",
    "cpu_int8_capabilities",
    "cpu_int8_preflight",
    "discover",
    "format_cpulist",
    "local_placement",
    "node_cpus",
    "parse_cpulist",
    "pin_loader_worker",
    "place_this_rank",
    "plan",
    "widen",
]
