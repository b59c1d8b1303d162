"""`python -m qatdist.topology`: print the placement plan of this machine (or a sysfs copy)."""

from __future__ import annotations

import argparse
import json
import os
import warnings

from qatdist.topology.discover import discover, parse_cpulist
from qatdist.topology.plan import plan


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
    """Print the plan (or the node count) for `argv`; exit status 2 with a message on bad input."""
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
