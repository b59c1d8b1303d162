"""topology.route: the address and interface that reach another host, GLOO_SOCKET_IFNAME
checks, the store reachability wait, and their command line (fake interface lists where the
answer would otherwise depend on this machine)."""

import errno
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

from qatdist.distributed import route
from qatdist.distributed.route import RouteError

FAKE = {"lo": ["127.0.0.1", "::1"], "veth7": ["10.231.0.1"], "ifb0": []}


def test_route_to_loopback_is_local_and_names_the_interface():
    found = route.route_to("127.0.0.1", FAKE)
    assert (found.address, found.interface) == ("127.0.0.1", "lo")
    assert found.is_local and found.is_loopback


def test_route_whose_source_no_interface_holds_lists_the_interfaces():
    with pytest.raises(RouteError, match="no interface holds") as e:
        route.route_to("127.0.0.1", {"veth7": ["10.231.0.1"]})
    assert "veth7: 10.231.0.1" in str(e.value)


def test_unresolvable_host_is_named_with_the_interfaces():
    with pytest.raises(RouteError, match="'nosuch.invalid' does not resolve") as e:
        route.route_to("nosuch.invalid", FAKE)
    assert "veth7: 10.231.0.1" in str(e.value) and "ifb0: no address" in str(e.value)


def test_unroutable_host_is_named_with_the_interfaces(monkeypatch):
    class Unroutable(socket.socket):
        def connect(self, address):
            raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(route.socket, "socket", Unroutable)
    with pytest.raises(RouteError, match="no route from this machine to '10.9.9.9'") as e:
        route.route_to("10.9.9.9", FAKE)
    assert "Network is unreachable" in str(e.value) and "lo: 127.0.0.1, ::1" in str(e.value)


def test_gloo_ifname_check_names_the_variable_and_each_bad_interface():
    assert route.check_gloo_ifname(None, FAKE) == []
    assert route.check_gloo_ifname("veth7,lo", FAKE) == ["veth7", "lo"]
    with pytest.raises(RouteError) as e:
        route.check_gloo_ifname("veth7,eth9,ifb0", FAKE)
    message = str(e.value)
    assert message.startswith("GLOO_SOCKET_IFNAME='veth7,eth9,ifb0'")
    assert "'eth9' (no such interface)" in message and "'ifb0' (has no address)" in message
    assert "veth7: 10.231.0.1" in message


def test_gloo_network_records_the_interface_set_or_the_hostname_address():
    env = {"GLOO_SOCKET_IFNAME": "veth7", "MASTER_ADDR": "10.231.0.2"}
    assert route.gloo_network(env, FAKE) == {
        "gloo_socket_ifname": "veth7",
        "master_addr": "10.231.0.2",
        "interface": "veth7",
        "address": "10.231.0.1",
        "source": "GLOO_SOCKET_IFNAME",
    }
    unset = route.gloo_network({}, route.interfaces())
    assert unset["gloo_socket_ifname"] is None
    assert unset["source"] == f"hostname {socket.gethostname()}"
    assert unset["address"] == route.resolve(socket.gethostname())
    with pytest.raises(RouteError, match="GLOO_SOCKET_IFNAME='eth9'"):
        route.gloo_network({"GLOO_SOCKET_IFNAME": "eth9"}, FAKE)


def test_split_endpoint():
    assert route.split_endpoint("10.0.0.1:29400") == ("10.0.0.1", 29400)
    assert route.split_endpoint("[fd00::1]:29400") == ("fd00::1", 29400)
    for bad in ("10.0.0.1", "host:", ":29400", "host:99999"):
        with pytest.raises(RouteError, match="expected host:port"):
            route.split_endpoint(bad)


def test_wait_for_listener_connects_or_names_the_address():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        route.wait_for_listener("127.0.0.1", server.getsockname()[1], 0)
        port = server.getsockname()[1]
    # The port is closed now: one try, then the error naming what was tried.
    with pytest.raises(RouteError, match=f"cannot connect to the store at 127.0.0.1:{port}"):
        route.wait_for_listener("127.0.0.1", port, 0, what="the store")


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qatdist.topology", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )


def test_cli_route_to_and_errors():
    out = run_cli("--route-to", "127.0.0.1")
    assert out.returncode == 0, out.stderr
    address, interface, is_local = out.stdout.split()
    assert address == "127.0.0.1" and is_local == "1"
    assert "127.0.0.1" in route.interfaces()[interface]
    # For several hosts a loopback route is refused: the others could not reach it.
    out = run_cli("--route-to", "localhost", "--other-hosts")
    assert out.returncode == 2 and "loopback address the other hosts cannot reach" in out.stderr
    out = run_cli("--route-to", "nosuch.invalid")
    assert out.returncode == 2 and "'nosuch.invalid' does not resolve" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_check_gloo_ifname(monkeypatch):
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "nosuch0"}
    out = run_cli("--check-gloo-ifname", env=env)
    assert out.returncode == 2 and "GLOO_SOCKET_IFNAME='nosuch0'" in out.stderr
    lo = next(name for name, addrs in route.interfaces().items() if "127.0.0.1" in addrs)
    out = run_cli("--check-gloo-ifname", env={**env, "GLOO_SOCKET_IFNAME": lo})
    assert out.returncode == 0 and out.stdout.split() == [lo]
