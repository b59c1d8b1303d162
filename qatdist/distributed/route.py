"""Which local address and network interface reach another host, and what gloo will bind to.

On many cluster images the hostname resolves to a loopback address (Debian's /etc/hosts maps
it to 127.0.1.1). torchrun then advertises the store by that name and gloo binds to loopback,
so ranks on other hosts cannot connect. `route_to()` asks the kernel instead: a UDP socket
connected to the host (no packet is sent) has the source address the routing table picks, and
`psutil.net_if_addrs()` names the interface that holds it. `launch/multinode.sh` passes the
result to torchrun (`--local_addr`) and to gloo (`GLOO_SOCKET_IFNAME`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

GLOO_IFNAME_VAR = "GLOO_SOCKET_IFNAME"

# What psutil.net_if_addrs() returns, reduced to what is used here: interface -> addresses.
Interfaces = Mapping[str, Sequence[str]]


class RouteError(ValueError):
    """A host that does not resolve or that no interface routes to, or a bad interface name."""


@dataclass(frozen=True)
class Route:
    """The local end of the kernel's route to `host`."""

    host: str  # as given
    host_address: str  # what `host` resolved to
    address: str  # the local source address the kernel picks for `host_address`
    interface: str  # the interface holding `address`

    @property
    def is_local(self) -> bool:
        """True when `host` is this machine: it resolved to one of this machine's addresses
        (a loopback address, or e.g. the address of eth0, which the kernel routes to itself)."""
        return self.host_address == self.address or ipaddress.ip_address(self.address).is_loopback

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def interfaces() -> dict[str, list[str]]:
    """Every interface of this machine with its IPv4 and IPv6 addresses (psutil)."""
    families = (socket.AF_INET, socket.AF_INET6)
    return {
        name: [_bare(a.address) for a in addrs if a.family in families]
        for name, addrs in psutil.net_if_addrs().items()
    }


def describe_interfaces(ifaces: Interfaces) -> str:
    """One line per interface, 'name: addr, addr' (or 'no address'), sorted by name."""
    lines = [f"  {name}: {', '.join(a) or 'no address'}" for name, a in sorted(ifaces.items())]
    return "\n".join(lines) or "  (none)"


def _bare(address: str) -> str:
    """An address without an IPv6 zone suffix ('fe80::1%eth0' -> 'fe80::1')."""
    return address.split("%", 1)[0]


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def resolve(host: str) -> str:
    """The first address `host` resolves to (IPv4 preferred, as torchrun's TCPStore connects);
    RouteError naming the host when it does not resolve."""
    name = _strip_brackets(host)
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RouteError(f"host {host!r} does not resolve: {e}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return _bare(infos[0][4][0])


def route_to(host: str, ifaces: Interfaces | None = None) -> Route:
    """The local address and interface the kernel uses to reach `host` (a name or address).

    Raises RouteError, naming the host and listing the interfaces, when it does not resolve,
    nothing routes to it, or the source address belongs to no interface in `ifaces`
    (default: this machine's, from psutil)."""
    ifaces = interfaces() if ifaces is None else ifaces
    listing = f"this machine's interfaces:\n{describe_interfaces(ifaces)}"
    try:
        target = resolve(host)
    except RouteError as e:
        raise RouteError(f"{e}\n{listing}") from None
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            # A UDP connect only looks the route up; the port is irrelevant but must be nonzero.
            sock.connect((target, 9))
        except OSError as e:
            raise RouteError(
                f"no route from this machine to {host!r} ({target}): {e.strerror}\n{listing}"
            ) from None
        address = _bare(sock.getsockname()[0])
    for name, addrs in ifaces.items():
        if address in addrs:
            return Route(host=host, host_address=target, address=address, interface=name)
    raise RouteError(
        f"the route to {host!r} ({target}) leaves from {address}, which no interface holds\n"
        f"{listing}"
    )


def check_gloo_ifname(value: str | None, ifaces: Interfaces | None = None) -> list[str]:
    """The interface names of a GLOO_SOCKET_IFNAME value (gloo takes a comma-separated list);
    RouteError naming the variable and listing the interfaces when one does not exist or has
    no address for gloo to bind to. `None` or '' (unset) gives []."""
    if not value:
        return []
    ifaces = interfaces() if ifaces is None else ifaces
    names = [name.strip() for name in value.split(",")]
    bad = [name for name in names if not ifaces.get(name)]
    if bad:
        what = ", ".join(
            f"{name!r} ({'has no address' if name in ifaces else 'no such interface'})"
            for name in bad
        )
        raise RouteError(
            f"{GLOO_IFNAME_VAR}={value!r}: {what}; this machine's interfaces:\n"
            f"{describe_interfaces(ifaces)}"
        )
    return names


def gloo_network(
    env: Mapping[str, str] | None = None, ifaces: Interfaces | None = None
) -> dict[str, str | None]:
    """What gloo in this process will use: `interface` and `address`, where they come from
    (`source`), `gloo_socket_ifname` as set and `master_addr`. With GLOO_SOCKET_IFNAME set,
    gloo binds to (the first of) its interface(s); without it, to the address this machine's
    hostname resolves to, which is loopback on many cluster images."""
    env = os.environ if env is None else env
    ifaces = interfaces() if ifaces is None else ifaces
    ifname = env.get(GLOO_IFNAME_VAR) or None
    record: dict[str, str | None] = {
        "gloo_socket_ifname": ifname,
        "master_addr": env.get("MASTER_ADDR"),
    }
    if ifname:
        first = check_gloo_ifname(ifname, ifaces)[0]
        addrs = list(ifaces[first])
        # gloo takes the interface's first address; IPv4 is what psutil lists first.
        return {**record, "interface": first, "address": addrs[0], "source": GLOO_IFNAME_VAR}
    hostname = socket.gethostname()
    try:
        address = resolve(hostname)
    except RouteError:
        address = None
    interface = next((n for n, a in ifaces.items() if address in a), None)
    return {**record, "interface": interface, "address": address, "source": f"hostname {hostname}"}


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); RouteError naming it when malformed."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RouteError(f"expected host:port, got {endpoint!r}")
    return _strip_brackets(host), int(port)


def wait_for_listener(host: str, port: int, wait_s: float, *, what: str = "") -> None:
    """Return once a TCP connect to host:port succeeds, retrying for up to `wait_s` seconds
    (the other end may start a little later); RouteError naming the address tried and the
    last error otherwise."""
    target = resolve(host)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # The connection is closed again at once: the listener sees a client that leaves.
            with socket.create_connection((target, port), timeout=min(2.0, max(wait_s, 0.1))):
                return
        except OSError as e:
            error = e.strerror or str(e)
        if time.monotonic() >= deadline:
            name = f"{host} ({target})" if target != host else host
            raise RouteError(
                f"cannot connect to {what + ' at ' if what else ''}{name}:{port} after "
                f"{wait_s:g} s: {error}"
            )
        time.sleep(0.5)
