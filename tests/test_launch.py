"""Placement applied in a real 2-rank run, and a 2-node run through torchrun's c10d rendezvous."""

import json
import os
import socket
import subprocess
import sys

from conftest import ROOT, tiny_run_args

from qatdist.topology import cpu_int8_capabilities, parse_cpulist


def test_two_rank_run_pins_disjoint_cores(two_rank_run):
    assert two_rank_run["result"].returncode == 0, two_rank_run["result"].stderr[-3000:]
    records = json.loads((two_rank_run["out_dir"] / "topology.json").read_text())
    assert [r["global_rank"] for r in records] == [0, 1]
    cpus = [set(r["placement"]["cpus"]) for r in records]
    assert cpus[0] and cpus[1] and not cpus[0] & cpus[1]
    for record in records:
        # What the kernel reports after pinning is exactly the plan.
        assert set(parse_cpulist(record["kernel_cpus_allowed_list"])) == set(
            record["placement"]["cpus"]
        )
        assert record["torch_threads"] == record["placement"]["threads"]
    # CPU preflight: rank 0 records the CPU's int8 instructions, as this machine reports them.
    assert records[0]["cpu_int8_capabilities"] == cpu_int8_capabilities()
    assert "cpu_int8_capabilities" not in records[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_via_c10d_rendezvous(tiny_shards, tmp_path):
    """Two torchrun agents on this machine act as two nodes of one job."""
    endpoint = f"127.0.0.1:{_free_port()}"
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    agents = []
    for node_rank, core in enumerate(sorted(os.sched_getaffinity(0))[:2]):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id=qatdist-test-{endpoint}",
            "-m",
            "qatdist.train",
            *tiny_run_args(
                tiny_shards,
                out_dir,
                # the smallest model: what is checked here is the rendezvous and the syncs
                "--model.name=tests.tiny_model:tiny_cnn",
                "--quant.ptq_calibration_batches=0",
                "--runtime.compile_final=false",
                f"--runtime.cores={core}",
                "--train.eval_every_epochs=0",
                "--quant.observer_freeze_step=-1",
                "--quant.bn_freeze_step=-1",
            ),
        ]
        log = open(tmp_path / f"agent{node_rank}.log", "w")
        agents.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log), log))
    try:
        codes = [agent.wait(timeout=600) for agent, _ in agents]
    finally:
        for agent, log in agents:
            agent.kill()
            log.close()
    logs = [(tmp_path / f"agent{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], logs
    report = json.loads((out_dir / "final" / "report.json").read_text())
    assert report["world_size"] == 2
    assert len(report["rank_state_sha256"]) == 2
    assert report["rank_state_sha256"][0] == report["rank_state_sha256"][1]
    # Nothing frozen: the ranks' statistics drift apart between syncs, and the final sync
    # (the first after the last step) brings them back together exactly.
    assert report["observer_sync_max_divergence_before"] > 0
    assert report["observer_sync_max_divergence_after"] == 0


def _multinode(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    """launch/multinode.sh with `extra_env`, this interpreter's torchrun first on PATH; only
    runs that stop before torchrun starts (the checks below)."""
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    env.update(PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}", PYTHONPATH=str(ROOT))
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "multinode.sh")],
        cwd=ROOT,
        env={**env, "NNODES": "2", **extra_env},
        capture_output=True,
        text=True,
        timeout=120,  # each stops in seconds; this only guards against a hang
    )


def test_multinode_refuses_a_missing_gloo_interface_naming_it():
    out = _multinode(
        {
            "NODE_RANK": "0",
            "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}",
            "GLOO_SOCKET_IFNAME": "nosuch0",
        }
    )
    assert out.returncode == 2, out.stderr
    assert "GLOO_SOCKET_IFNAME='nosuch0': 'nosuch0' (no such interface)" in out.stderr


def test_multinode_refuses_a_loopback_endpoint_for_several_hosts():
    out = _multinode({"NODE_RANK": "0", "RDZV_ENDPOINT": f"localhost:{_free_port()}"})
    assert out.returncode == 2, out.stderr
    assert "loopback address the other hosts cannot reach" in out.stderr
    assert "cannot choose this host's address for RDZV_ENDPOINT=localhost:" in out.stderr


def test_multinode_names_an_unreachable_store_promptly():
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens there
    out = _multinode(
        {
            "NODE_RANK": "1",
            "RDZV_ENDPOINT": endpoint,
            "RDZV_IS_HOST": "0",
            "LOCAL_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": "lo",
            "RDZV_WAIT_S": "1",
        }
    )
    assert out.returncode == 2, out.stderr
    assert f"cannot connect to the rendezvous store at {endpoint} after 1 s" in out.stderr
    assert "RendezvousConnectionError" not in out.stderr  # torchrun never started


def test_worker_refuses_a_missing_gloo_interface_naming_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "nosuch0"}
    out = subprocess.run(
        [sys.executable, "-m", "qatdist.train", f"--run.out_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "GLOO_SOCKET_IFNAME='nosuch0'" in out.stderr
    assert not (tmp_path / "run").exists()
