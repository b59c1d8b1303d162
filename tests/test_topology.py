"""Placement planning on fake sysfs trees, the CLI, and `apply` on this machine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qatdist.topology import (
    RankPlacement,
    cpu_int8_capabilities,
    cpu_int8_preflight,
    discover,
    format_cpulist,
    parse_cpulist,
    plan,
)

REPO = Path(__file__).resolve().parent.parent


def fake_sysfs(
    root: Path, sockets: int = 2, cores: int = 28, smt: int = 2, nodes_per_socket: int = 1
) -> str:
    """Write a sysfs tree numbered like Linux: first threads of every core, then the siblings."""
    total_cores = sockets * cores
    per_node = cores // nodes_per_socket
    node_cpus: dict[int, list[int]] = {}
    for s in range(sockets):
        for c in range(cores):
            siblings = [t * total_cores + s * cores + c for t in range(smt)]
            node = s * nodes_per_socket + c // per_node
            node_cpus.setdefault(node, []).extend(siblings)
            for cpu in siblings:
                topo = root / "devices/system/cpu" / f"cpu{cpu}" / "topology"
                topo.mkdir(parents=True)
                (topo / "physical_package_id").write_text(f"{s}\n")
                (topo / "core_id").write_text(f"{c}\n")
                (topo / "thread_siblings_list").write_text(format_cpulist(siblings) + "\n")
                (topo / "core_cpus_list").write_text(format_cpulist(siblings) + "\n")
    (root / "devices/system/cpu/online").write_text(f"0-{total_cores * smt - 1}\n")
    for node, cpus in node_cpus.items():
        ndir = root / "devices/system/node" / f"node{node}"
        ndir.mkdir(parents=True)
        (ndir / "cpulist").write_text(format_cpulist(cpus) + "\n")
    return str(root)


def all_cpus(placement: RankPlacement) -> set[int]:
    return set(placement.cpus) | set(placement.loader_cpus)


def assert_disjoint(placements: list[RankPlacement]) -> None:
    seen: set[int] = set()
    for p in placements:
        assert not seen & all_cpus(p), f"rank {p.rank} reuses CPUs {seen & all_cpus(p)}"
        seen |= all_cpus(p)


def test_cpulist_round_trip_and_errors():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("0-7:2/4") == [0, 1, 4, 5]
    assert parse_cpulist("") == []
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10, 3]) == "0-3,8,10-11"
    for bad in ("0-", "a", "3-1", "1,,2", "0-4294967295"):
        with pytest.raises(ValueError, match="invalid CPU list"):
            parse_cpulist(bad)


def test_two_sockets_two_ranks_get_one_socket_each(tmp_path):
    topo = discover(fake_sysfs(tmp_path))
    assert topo.warnings == []
    assert len({c.core for c in topo.cpus.values()}) == 56
    placements = plan(topo, 2, loader_cores=0)
    assert [p.cpus for p in placements] == [list(range(28)), list(range(28, 56))]
    assert [(p.node, p.nodes, p.membind, p.threads) for p in placements] == [
        (0, [0], [0], 28),
        (1, [1], [1], 28),
    ]

    # The default loader core is the last core of the rank's own socket.
    placements = plan(topo, 2)
    assert placements[0].cpus == list(range(27)) and placements[0].loader_cpus == [27]
    assert placements[1].cpus == list(range(28, 55)) and placements[1].loader_cpus == [55]
    assert placements[0].threads == 27


def test_sub_numa_clustering_two_ranks_take_a_socket_each(tmp_path):
    topo = discover(fake_sysfs(tmp_path, nodes_per_socket=2))
    assert list(topo.nodes) == [0, 1, 2, 3]
    placements = plan(topo, 2, loader_cores=0)
    assert [p.cpus for p in placements] == [list(range(28)), list(range(28, 56))]
    assert [p.membind for p in placements] == [[0, 1], [2, 3]]
    assert [p.node for p in placements] == [0, 2]


def test_sub_numa_clustering_eight_ranks_split_each_node(tmp_path):
    topo = discover(fake_sysfs(tmp_path, nodes_per_socket=2))
    placements = plan(topo, 8, loader_cores=0)
    assert_disjoint(placements)
    assert [p.node for p in placements] == [0, 0, 1, 1, 2, 2, 3, 3]
    for p in placements:
        assert len(p.cpus) == 7 and p.nodes == [p.node] and p.membind == [p.node]
        assert set(p.cpus) <= set(topo.nodes[p.node])
    assert set().union(*(p.cpus for p in placements)) == set(range(56))


def test_uneven_rank_counts_stay_on_one_socket_and_use_every_core(tmp_path):
    topo = discover(fake_sysfs(tmp_path, nodes_per_socket=2))
    placements = plan(topo, 3, loader_cores=0)
    assert [p.membind for p in placements] == [[0], [1], [2, 3]]
    for n in (3, 5, 6, 7):
        placements = plan(topo, n, loader_cores=0)
        assert_disjoint(placements)
        assert set().union(*(p.cpus for p in placements)) == set(range(56))
        for p in placements:
            assert len({topo.cpus[c].socket for c in p.cpus}) == 1


def test_one_rank_on_two_sockets_uses_both(tmp_path):
    (p,) = plan(discover(fake_sysfs(tmp_path)), 1, loader_cores=0)
    assert p.cpus == list(range(56)) and p.membind == [0, 1]


def test_use_smt_adds_siblings(tmp_path):
    topo = discover(fake_sysfs(tmp_path))
    placements = plan(topo, 2, use_smt=True, loader_cores=0)
    assert placements[0].cpus == list(range(28)) + list(range(56, 84))
    assert placements[1].cpus == list(range(28, 56)) + list(range(84, 112))
    assert placements[0].threads == 56
    # Without use_smt siblings stay out even when allowed.
    assert max(plan(topo, 2)[1].cpus) < 56


def test_single_node_two_cpus_two_ranks(tmp_path):
    topo = discover(fake_sysfs(tmp_path, sockets=1, cores=2, smt=1))
    placements = plan(topo, 2)
    assert [(p.cpus, p.loader_cpus, p.threads, p.membind) for p in placements] == [
        ([0], [0], 1, [0]),
        ([1], [1], 1, [0]),
    ]


def test_restricted_allowed_set_is_honoured(tmp_path):
    topo = discover(fake_sysfs(tmp_path, nodes_per_socket=2))
    allowed = set(range(14)) | set(range(28, 42))
    placements = plan(topo, 2, allowed_cpus=allowed, loader_cores=0)
    assert [p.cpus for p in placements] == [list(range(14)), list(range(28, 42))]
    # Nodes 1 and 3 have no allowed CPUs and are skipped.
    assert [p.membind for p in placements] == [[0], [2]]
    placements = plan(topo, 4, allowed_cpus=allowed, use_smt=True)
    assert_disjoint(placements)
    assert set().union(*(all_cpus(p) for p in placements)) == allowed
    with pytest.raises(ValueError, match="only 28 allowed physical cores"):
        plan(topo, 29, allowed_cpus=allowed)


def test_explicit_cores_override(tmp_path):
    topo = discover(fake_sysfs(tmp_path))
    placements = plan(topo, 2, explicit_cores="0-3,56-59; 28-31", loader_cores=0)
    assert placements[0].cpus == [0, 1, 2, 3, 56, 57, 58, 59]
    assert placements[1].cpus == [28, 29, 30, 31]
    assert [p.membind for p in placements] == [[0], [1]]
    placements = plan(topo, 2, explicit_cores="0-3;28-31", threads=2)
    assert placements[0].loader_cpus == [3] and placements[0].threads == 2

    with pytest.raises(ValueError, match="names 3 ranks but nproc_per_node is 2"):
        plan(topo, 2, explicit_cores="0;1;2")
    with pytest.raises(ValueError, match="CPU 3 is given to ranks 0 and 1"):
        plan(topo, 2, explicit_cores="0-3;3-5")
    with pytest.raises(ValueError, match="not allowed"):
        plan(topo, 2, explicit_cores="0-3;28-31", allowed_cpus=set(range(28)))
    with pytest.raises(ValueError, match="rank 1"):
        plan(topo, 2, explicit_cores="0-3;x")


def test_loader_cores_come_from_the_rank_own_set(tmp_path):
    topo = discover(fake_sysfs(tmp_path, nodes_per_socket=2))
    placements = plan(topo, 4, loader_cores=2, use_smt=True)
    assert_disjoint(placements)
    for p in placements:
        assert not set(p.cpus) & set(p.loader_cpus)
        assert set(p.loader_cpus) <= set(topo.nodes[p.node])
        # Two whole physical cores, siblings included, taken from the end of the rank's set.
        assert len({topo.cpus[c].core for c in p.loader_cpus}) == 2
        assert min(p.loader_cpus) > max(c for c in p.cpus if c < 56)
    # A small rank keeps every core for compute; its loader shares the last ones.
    (p,) = plan(topo, 1, allowed_cpus={0, 1, 2}, loader_cores=8)
    assert p.cpus == [0, 1, 2] and p.loader_cpus == [0, 1, 2]
    (p,) = plan(topo, 1, allowed_cpus={0, 1}, loader_cores=1)
    assert p.cpus == [0, 1] and p.threads == 2 and p.loader_cpus == [1]


def test_no_node_dir_falls_back_to_one_node(tmp_path):
    root = fake_sysfs(tmp_path)
    for ndir in (tmp_path / "devices/system/node").iterdir():
        (ndir / "cpulist").unlink()
        ndir.rmdir()
    with (
        pytest.warns(UserWarning, match="no nodeN directories"),
        pytest.warns(UserWarning, match="as a single NUMA node"),
    ):
        topo = discover(root)
    assert list(topo.nodes) == [0] and len(topo.cpus) == 112
    placements = plan(topo, 2, loader_cores=0)
    # Sockets are still known, so each rank keeps to one.
    assert [p.cpus for p in placements] == [list(range(28)), list(range(28, 56))]


def test_garbage_cpulist_falls_back_with_warning(tmp_path):
    root = fake_sysfs(tmp_path, sockets=1, cores=4, smt=1, nodes_per_socket=2)
    (tmp_path / "devices/system/node/node1/cpulist").write_text("2-x\n")
    with (
        pytest.warns(UserWarning, match=r"garbage in .*node1/cpulist"),
        pytest.warns(UserWarning, match="as a single NUMA node"),
    ):
        topo = discover(root)
    assert topo.nodes == {0: [0, 1, 2, 3]}
    assert [p.cpus for p in plan(topo, 2, loader_cores=0)] == [[0, 1], [2, 3]]


def test_missing_topology_files_fall_back_with_warning(tmp_path):
    root = fake_sysfs(tmp_path, sockets=2, cores=2, smt=2)
    for name in ("physical_package_id", "core_id", "thread_siblings_list", "core_cpus_list"):
        (tmp_path / "devices/system/cpu/cpu1/topology" / name).unlink()
    (tmp_path / "devices/system/cpu/cpu6/topology/thread_siblings_list").write_text("junk")
    with pytest.warns(UserWarning) as record:
        topo = discover(root)
    messages = " ".join(str(w.message) for w in record)
    assert "physical_package_id for CPUs 1" in messages
    assert "own physical core" in messages
    # cpu1 lost its sibling info; cpu6 still pairs with cpu2 through core_cpus_list.
    assert topo.cpus[1].core == 1 and topo.cpus[5].core == 1 and topo.cpus[6].core == 2
    placements = plan(topo, 2, loader_cores=0)
    assert_disjoint(placements)
    assert [p.membind for p in placements] == [[0], [1]]


def test_missing_cpu_dir_keeps_nodes(tmp_path):
    root = fake_sysfs(tmp_path, sockets=1, cores=4, smt=1, nodes_per_socket=2)
    cpu_dir = tmp_path / "devices/system/cpu"
    cpu_dir.rename(tmp_path / "cpu-gone")
    with pytest.warns(UserWarning, match="each CPU as a physical core"):
        topo = discover(root)
    assert topo.nodes == {0: [0, 1], 1: [2, 3]}
    assert [p.membind for p in plan(topo, 2)] == [[0], [1]]


def test_missing_sysfs_falls_back_to_this_machine(tmp_path):
    with (
        pytest.warns(UserWarning, match="does not exist"),
        pytest.warns(UserWarning, match="cannot list NUMA nodes"),
        pytest.warns(UserWarning, match="as a single NUMA node"),
    ):
        topo = discover(str(tmp_path / "nowhere"))
    assert set(os.sched_getaffinity(0)) <= set(topo.cpus)
    (p,) = plan(topo, 1, allowed_cpus=set(os.sched_getaffinity(0)), loader_cores=0)
    assert p.cpus == sorted(os.sched_getaffinity(0))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qatdist.topology", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_cli_prints_plan_json(tmp_path):
    root = fake_sysfs(tmp_path, nodes_per_socket=2)
    out = run_cli("--sysfs-root", root, "--nproc-per-node", "4", "--allowed-cpus", "0-55")
    assert out.returncode == 0, out.stderr
    ranks = json.loads(out.stdout)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    for r in ranks:
        assert {"rank", "node", "cpus", "threads", "membind"} <= r.keys()
        assert r["membind"] == [r["node"]] and r["threads"] == len(r["cpus"]) == 13
    out = run_cli("--sysfs-root", root, "--count-nodes", "--allowed-cpus", "0-13,28-41")
    assert out.returncode == 0 and out.stdout.strip() == "2"

    for bad in (
        ["--sysfs-root", root, "--nproc-per-node", "2", "--cores", "0-3;3-5"],
        ["--sysfs-root", root, "--nproc-per-node", "0"],
        ["--sysfs-root", root, "--nproc-per-node", "2", "--allowed-cpus", "1-x"],
    ):
        out = run_cli(*bad)
        assert out.returncode == 2 and "error:" in out.stderr
        assert "Traceback" not in out.stderr


def test_apply_pins_this_process():
    # A subprocess, so this test process keeps its affinity and thread count.
    script = textwrap.dedent(
        """
        import json, os
        from qatdist.topology import AppliedPlacement, apply, local_placement, pin_loader_worker
        p = local_placement(0, 1, loader_cores=0)
        before = sorted(os.sched_getaffinity(0))
        off = apply(p, pin=False)
        on = apply(p)
        assert isinstance(on, AppliedPlacement) and on.placement is p, type(on)
        typed = {"pinning": [off.pinning, on.pinning], "kernel_cpus": on.kernel_cpus,
                 "affinity": on.applied.affinity, "membind": on.applied.membind,
                 "torch_threads": on.torch_threads}
        pin_loader_worker(p.cpus[-1:])
        import torch
        print(json.dumps({"plan": p.to_dict(), "off": off.to_dict(), "on": on.to_dict(),
                          "typed": typed, "before": before,
                          "worker": [sorted(os.sched_getaffinity(0)), torch.get_num_threads()]}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    plan_, on, off, typed = res["plan"], res["on"], res["off"], res["typed"]
    assert plan_["cpus"] == sorted(os.sched_getaffinity(0))
    assert parse_cpulist(on["kernel_cpus_allowed_list"]) == plan_["cpus"]
    assert on["applied"]["affinity"] and on["torch_threads"] == plan_["threads"]
    assert on["membind_status"] == "bound" or on["membind_status"].startswith("libnuma unavailable")
    assert on["applied"]["membind"] == (on["membind_status"] == "bound")
    assert set(parse_cpulist(on["kernel_mems_allowed_list"])) >= set(plan_["membind"])
    assert on["env"]["OMP_NUM_THREADS"] == str(plan_["threads"])
    assert off["pinning"] == "off" and not off["applied"]["affinity"]
    assert parse_cpulist(off["kernel_cpus_allowed_list"]) == res["before"]
    assert res["worker"] == [plan_["cpus"][-1:], 1]
    # The typed fields say what the JSON record says.
    assert typed == {
        "pinning": [False, True],
        "kernel_cpus": plan_["cpus"],
        "affinity": True,
        "membind": on["applied"]["membind"],
        "torch_threads": plan_["threads"],
    }
    # topology.json's record keeps its key names; node_cpus is empty from apply alone.
    assert set(on) == set(TOPOLOGY_RECORD_KEYS)
    assert set(on["applied"]) == {"affinity", "membind", "omp_env", "torch_threads"}
    assert set(on["env"]) == {"OMP_NUM_THREADS", "removed"} and on["node_cpus"] == []


TOPOLOGY_RECORD_KEYS = (
    "placement",
    "pinning",
    "applied",
    "membind_status",
    "env",
    "warnings",
    "kernel_cpus_allowed_list",
    "kernel_mems_allowed_list",
    "torch_threads",
    "node_cpus",
)


def test_place_this_rank_returns_the_applied_placement_with_node_cpus():
    script = textwrap.dedent(
        """
        import json, os
        from qatdist.config import RuntimeConfig
        from qatdist.distributed import DistEnv
        from qatdist.topology import node_cpus, local_placement, place_this_rank
        before = sorted(os.sched_getaffinity(0))
        expected = node_cpus(local_placement(0, 1))
        cfg = RuntimeConfig(pinning="off")
        got = place_this_rank(cfg, DistEnv(0, 1, 0, 1, 0))
        print(json.dumps({"record": got.to_dict(), "expected": expected, "before": before,
                          "pinning": got.pinning, "node_cpus": got.node_cpus}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["pinning"] is False and res["record"]["pinning"] == "off"
    assert res["node_cpus"] == res["expected"] == res["record"]["node_cpus"]
    assert set(res["node_cpus"]) <= set(res["before"]) and res["node_cpus"]
    # Pinning off: the process keeps its whole allowed set.
    assert parse_cpulist(res["record"]["kernel_cpus_allowed_list"]) == res["before"]
    assert set(res["record"]) == set(TOPOLOGY_RECORD_KEYS)


def fake_cpuinfo(path: Path, flags_per_cpu: list[str], model: str = "Fake CPU") -> str:
    """A /proc/cpuinfo with one block per processor, each with its `flags` line."""
    blocks = [
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
        f"flags\t\t: fpu sse sse2 avx avx2 fma {flags}\n"
        for i, flags in enumerate(flags_per_cpu)
    ]
    path.write_text("\n".join(blocks))
    return str(path)


def test_cpu_int8_capabilities_avx512_vnni(tmp_path):
    path = fake_cpuinfo(tmp_path / "cpuinfo", ["avx512f avx512_vnni"] * 2, model="Xeon X")
    caps = cpu_int8_capabilities(path)
    assert caps["avx512_vnni"] and caps["int8_dot_product"]
    assert not caps["amx_int8"] and not caps["amx_tile"] and not caps["avx_vnni"]
    assert not caps["avx512_bf16"] and caps["cpu_model"] == "Xeon X"
    assert caps["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    json.dumps(caps)


def test_cpu_int8_capabilities_amx_int8(tmp_path):
    path = fake_cpuinfo(tmp_path / "cpuinfo", ["amx_tile amx_int8 amx_bf16 avx512_bf16"])
    caps = cpu_int8_capabilities(path)
    assert caps["amx_int8"] and caps["amx_tile"] and caps["avx512_bf16"]
    assert caps["int8_dot_product"] and not caps["avx512_vnni"]


def test_cpu_without_int8_dot_product_warns(tmp_path, caplog):
    # One processor lacking the flag is enough: a rank may run on it.
    path = fake_cpuinfo(tmp_path / "cpuinfo", ["avx_vnni", "avx512_bf16"])
    caps = cpu_int8_capabilities(path)
    assert not any(caps[f] for f in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"))
    assert caps["int8_dot_product"] is False
    with caplog.at_level(logging.WARNING, logger="qatdist.topology"):
        assert cpu_int8_preflight(path) == caps
    assert "no faster than fp32" in caplog.text and "avx512_vnni" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qatdist.topology"):
        cpu_int8_preflight(fake_cpuinfo(tmp_path / "vnni", ["avx512_vnni"]))
    assert caplog.text == ""


def test_cpu_int8_capabilities_errors_name_the_file(tmp_path):
    with pytest.raises(OSError, match="missing"):
        cpu_int8_capabilities(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("processor\t: 0\n")
    with pytest.raises(ValueError, match="no 'flags' line in .*empty"):
        cpu_int8_capabilities(str(tmp_path / "empty"))
