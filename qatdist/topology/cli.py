"""`python -m qatdist.topology`: print the placement plan of this machine (or a sysfs copy), or
the local address and interface that reach another host (for launch/multinode.sh)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from qatdist.distributed.route import (
    GLOO_IFNAME_VAR,
    RouteError,
    check_gloo_ifname,
    describe_interfaces,
    interfaces,
    route_to,
    split_endpoint,
    wait_for_listener,
)
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
    mode.add_argument(
        "--route-to",
        metavar="HOST",
        help="Print 'ADDRESS INTERFACE IS_LOCAL' for HOST (a name or address): the local "
        "address and interface the kernel routes to it, and 1 if HOST is this machine (one of "
        "its addresses, or loopback), else 0. Exit status 2, listing the interfaces, when HOST "
        "does not resolve or nothing routes to it.",
    )
    mode.add_argument(
        "--check-gloo-ifname",
        action="store_true",
        help=f"Check that every interface named in ${GLOO_IFNAME_VAR} (comma-separated) exists "
        "and has an address; print them, or exit status 2 listing the interfaces. Unset: "
        "prints nothing.",
    )
    mode.add_argument(
        "--wait-for",
        metavar="HOST:PORT",
        help="Wait until a TCP connect to HOST:PORT succeeds (retrying for --wait-s seconds), "
        "then exit 0; exit status 2 naming the address otherwise. launch/multinode.sh checks "
        "the rendezvous store with it.",
    )
    p.add_argument(
        "--wait-s",
        metavar="S",
        type=float,
        default=30.0,
        help="With --wait-for: how long to keep retrying (default 30).",
    )
    p.add_argument(
        "--other-hosts",
        action="store_true",
        help="With --route-to: the address is for other hosts to connect to, so a loopback "
        "route (HOST resolves to 127.x or ::1 here) is an error.",
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
    if args.route_to is not None or args.check_gloo_ifname or args.wait_for is not None:
        return _network(args)
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


def _network(args: argparse.Namespace) -> int:
    """--route-to / --check-gloo-ifname / --wait-for: one line on stdout (none for
    --wait-for), or the error on stderr and status 2."""
    prog = "python -m qatdist.topology"
    try:
        if args.wait_for is not None:
            host, port = split_endpoint(args.wait_for)
            wait_for_listener(host, port, args.wait_s, what="the rendezvous store")
            return 0
        if args.check_gloo_ifname:
            print(" ".join(check_gloo_ifname(os.environ.get(GLOO_IFNAME_VAR))))
            return 0
        route = route_to(args.route_to)
        if args.other_hosts and route.is_loopback:
            raise RouteError(
                f"{args.route_to!r} resolves to {route.host_address} on this machine, a loopback "
                "address the other hosts cannot reach: name the host by an address of its "
                f"cluster interface instead; this machine's interfaces:\n"
                f"{describe_interfaces(interfaces())}"
            )
    except RouteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(route.address, route.interface, int(route.is_local))
    return 0
