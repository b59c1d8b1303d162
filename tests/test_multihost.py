"""Two hosts for real: two network namespaces joined by a veth pair, each its own network stack
and address, with the hostname resolving to loopback in both (Debian's /etc/hosts layout), one
torchrun agent in each through `launch/multinode.sh` exactly as docs/placement.md tells a user.
"localhost"-style addressing fails here; only the route-based choice of address and interface
works. Needs root and `ip netns` (iproute2): skips with the reason on a developer's machine
without them, fails under CI=true (`conftest.require`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from jobs import ROOT, Job, launch_env
from test_fault_tolerance import STEPS, report_of, run_args, steps_written

pytestmark = pytest.mark.slow


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2's `ip` not found (make install installs it as root with apt-get)"
    probe = f"qdp{os.getpid()}"
    added = _ip("netns", "add", probe)
    if added.returncode != 0:
        return f"`ip netns add` fails here: {added.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _remove_namespace(name: str) -> None:
    for pid in _ip("netns", "pids", name).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name)  # takes the veth end inside it, and so the pair, along
    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces 'a' and 'b' (unique names per run), a veth pair 10.231.N.1/.2 between
    them, loopback up, and in each an /etc/hosts (bind-mounted by `ip netns exec`) mapping
    the hostname to 127.0.1.1. Everything is removed whatever happens."""
    why = _why_no_netns()
    require(why is None, why or "")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    made: list[str] = []
    try:
        found = {}
        for i, side in enumerate("ab"):
            name = f"qd{tag}{side}"
            assert _ip("netns", "add", name).returncode == 0
            made.append(name)
            os.makedirs(f"/etc/netns/{name}", exist_ok=True)
            Path(f"/etc/netns/{name}/hosts").write_text(
                f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n"
            )
            found[side] = {"ns": name, "veth": f"qv{tag}{side}", "addr": f"{subnet}.{i + 1}"}
        a, b = found["a"], found["b"]
        steps = [
            ["link", "add", a["veth"], "type", "veth", "peer", "name", b["veth"]],
            *[["link", "set", h["veth"], "netns", h["ns"]] for h in (a, b)],
            *[["-n", h["ns"], "addr", "add", f"{h['addr']}/24", "dev", h["veth"]] for h in (a, b)],
            *[
                ["-n", h["ns"], "link", "set", dev, "up"]
                for h in (a, b)
                for dev in ("lo", h["veth"])
            ],
        ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        for h in (a, b):
            resolved = subprocess.run(
                ["ip", "netns", "exec", h["ns"], "getent", "hosts", socket.gethostname()],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            assert resolved.startswith("127."), resolved  # the condition this test is about
        yield found
    finally:
        for name in made:
            _remove_namespace(name)
        for link in (f"qv{tag}a", f"qv{tag}b"):
            _ip("link", "del", link)  # only if creation failed half-way


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_two_hosts(hosts, shards, out_dir: Path, *, max_restarts: int = 0) -> dict[str, Job]:
    """One agent per namespace via launch/multinode.sh; host a owns the endpoint."""
    endpoint = f"{hosts['a']['addr']}:{_free_port()}"
    jobs = {}
    for node_rank, side in enumerate("ab"):
        env = launch_env(
            {
                "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                "NNODES": "2",
                "NODE_RANK": str(node_rank),
                "RDZV_ENDPOINT": endpoint,
                "NPROC": "1",
                "MAX_RESTARTS": str(max_restarts),
            }
        )
        env.pop("GLOO_SOCKET_IFNAME", None)  # chosen by multinode.sh, not by the user
        args = run_args(
            shards,
            out_dir,
            f"--runtime.cores={node_rank % len(os.sched_getaffinity(0))}",
            "--runtime.timeout_s=120",
            # Nothing frozen: the statistics drift apart between syncs and the final sync
            # must bring them back together exactly.
            "--quant.observer_freeze_step=-1",
            "--quant.bn_freeze_step=-1",
        )
        command = ["ip", "netns", "exec", hosts[side]["ns"], "bash"]
        command += [str(ROOT / "launch" / "multinode.sh"), *args]
        jobs[side] = Job(command, out_dir.parent / f"logs-{side}", env=env)
    return jobs


def wait_all(jobs: dict[str, Job]) -> dict[str, int]:
    try:
        return {side: job.wait() for side, job in jobs.items()}
    finally:
        for job in jobs.values():
            job.close()


@pytest.fixture(scope="module")
def reference(hosts, tiny_shards, tmp_path_factory) -> dict:
    """The uninterrupted two-host run."""
    out_dir = tmp_path_factory.mktemp("two-hosts") / "run"
    jobs = start_two_hosts(hosts, tiny_shards, out_dir)
    codes = wait_all(jobs)
    return {"jobs": jobs, "codes": codes, "out_dir": out_dir}


def test_two_hosts_train_on_the_routed_interfaces(hosts, reference):
    jobs = reference["jobs"]
    assert reference["codes"] == {"a": 0, "b": 0}, {s: j.output() for s, j in jobs.items()}
    assert "hosts the rendezvous store" in jobs["a"].stderr
    assert "joins the rendezvous store" in jobs["b"].stderr
    for side, job in jobs.items():
        veth, addr = hosts[side]["veth"], hosts[side]["addr"]
        # Each rank says what it binds to (its rank number is torchrun's choice).
        assert f"network: gloo interface {veth} address {addr} " in job.stderr, job.output()
    records = json.loads((reference["out_dir"] / "topology.json").read_text())
    networks = {r["network"]["interface"]: r["network"] for r in records}
    assert networks.keys() == {hosts["a"]["veth"], hosts["b"]["veth"]}
    for side in "ab":
        assert networks[hosts[side]["veth"]]["address"] == hosts[side]["addr"]
    assert {n["master_addr"] for n in networks.values()} <= {hosts["a"]["addr"], hosts["b"]["addr"]}
    report = report_of(reference["out_dir"])
    assert report["world_size"] == 2 and report["steps"] == STEPS
    assert report["rank_state_sha256"][0] == report["rank_state_sha256"][1]
    assert report["observer_sync_max_divergence_before"] > 0
    assert report["observer_sync_max_divergence_after"] == 0


def test_host_b_worker_killed_recovers_bitwise(hosts, reference, tiny_shards, tmp_path):
    assert reference["codes"] == {"a": 0, "b": 0}
    out_dir = tmp_path / "run"
    jobs = start_two_hosts(hosts, tiny_shards, out_dir, max_restarts=1)
    try:
        jobs["b"].wait_until(lambda: steps_written(out_dir), "a first checkpoint")
        (victim,) = jobs["b"].workers().values()
        victim.send_signal(signal.SIGKILL)
        killed_at = max(steps_written(out_dir))
    finally:
        codes = wait_all(jobs)
    assert codes == {"a": 0, "b": 0}, {s: j.output() for s, j in jobs.items()}
    assert "exitcode: -9" in jobs["b"].stderr
    report = report_of(out_dir)
    assert report["steps"] == STEPS
    # Resumed from the newest checkpoint written before the kill (or one completed as it
    # landed), not from scratch.
    assert report["resumed_from_step"] is not None and report["resumed_from_step"] >= killed_at
    resumed = report["resumed_from_step"]
    logs = jobs["a"].stderr + jobs["b"].stderr
    assert f"resumed from {out_dir / 'checkpoints' / f'step-{resumed}'}" in logs
    reference_report = report_of(reference["out_dir"])
    assert report["final_state_sha256"] == reference_report["final_state_sha256"]
