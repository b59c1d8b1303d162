"""benchmarks/peers.py and `scripts/bench.py --peers`: the ratio, the agreement verdicts and the
missing-package path without the peers installed; a hanging peer stopped at its deadline and a
failing qatdist stack as an error (with stand-in stack processes); an OpenVINO smoke run when it
is installed."""

from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest
import torch
from conftest import CAMVID, require, require_shared
from test_bench import _load_script

from benchmarks import peers


def test_int8_vs_best_peer_takes_the_fastest_peer_int8():
    ms = {"qatdist_int8": 3.0, "openvino_int8": 2.0, "ort_int8": 2.5, "openvino_fp32": 0.5}
    assert peers.int8_vs_best_peer(ms) == pytest.approx(1.5)  # fp32 stacks are not peers
    assert peers.int8_vs_best_peer({"qatdist_int8": 3.0, "ort_int8": 6.0}) == pytest.approx(0.5)
    assert peers.int8_vs_best_peer({"qatdist_int8": 3.0, "inductor_fp32": 1.0}) is None
    assert peers.int8_vs_best_peer({"openvino_int8": 3.0}) is None


def test_int8_vs_best_peer_takes_qatdists_fastest_artifact_and_names_it():
    ms = {
        "qatdist_int8": 3.0,
        "qatdist_int8_aoti": 2.4,
        "qatdist_int8_openvino": 2.2,
        "qatdist_int8_cpp_wrapper": 1.0,  # a lever, not an artifact qatdist ships
        "openvino_int8": 2.0,
    }
    assert peers.fastest_qatdist(ms) == "qatdist_int8_openvino"
    assert peers.int8_vs_best_peer(ms) == pytest.approx(1.1)
    assert peers.fastest_qatdist({"openvino_int8": 1.0, "qatdist_int8_cpp_wrapper": 1.0}) is None


def test_geomean_is_per_batch_size_over_measured_rows():
    rows = [
        {"batch_size": 1, "int8_vs_best_peer": 2.0},
        {"batch_size": 1, "int8_vs_best_peer": 0.5},
        {"batch_size": 32, "int8_vs_best_peer": 1.2},
        {"batch_size": 32, "int8_vs_best_peer": None},  # no peer ran for that model
    ]
    assert peers.geomean_int8_vs_best_peer(rows) == {1: pytest.approx(1.0), 32: 1.2}


def test_missing_packages_name_the_package_and_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "nncf" else real(name)
    )
    missing = peers.missing_packages()
    assert "nncf" in missing["openvino_int8"]
    assert "pip install -e '.[peers]'" in missing["openvino_int8"]
    assert "qatdist_int8" not in missing and "inductor_fp32" not in missing


def test_agreement_flags_a_broken_stack_and_an_int8_without_int8_kernels():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(8, 1000, generator=generator)
    close = reference + 0.05 * torch.randn(8, 1000, generator=generator)
    unrelated = torch.randn(8, 1000, generator=generator)
    good = peers.agreement(close, reference, "ort_int8")
    assert good["ok"] and good["rel_error"] == pytest.approx(0.05, rel=0.2)
    assert peers._not_timed("ort_int8", good | {"int8_kernels": [20, 21]}) is None
    assert "no convolution or linear" in peers._not_timed(
        "ort_int8", good | {"int8_kernels": [0, 21]}
    )
    broken = peers.agreement(unrelated, reference, "qatdist_int8")
    assert not broken["ok"] and broken["rel_error"] > 1.0
    assert "relative logit error" in peers._not_timed("qatdist_int8", broken)
    # The same int8-sized error is far outside the fp32 stacks' bound.
    assert not peers.agreement(close, reference, "openvino_fp32")["ok"]


def test_bench_peers_writes_peer_keys_and_prints_what_could_not_run(monkeypatch, tmp_path, capsys):
    def fake(name, **kwargs):
        rows = [
            {"batch_size": b, "ms": {"qatdist_int8": 2.0 * b, "ort_int8": 1.0 * b}}
            for b in kwargs["batch_sizes"]
        ]
        for row in rows:
            row["int8_vs_best_peer"] = peers.int8_vs_best_peer(row["ms"])
            row["fastest_qatdist"] = peers.fastest_qatdist(row["ms"])
        ok = {"rel_error": 0.01, "bound": 0.25, "ok": True, "top1_agreement": 0.5}
        return {
            "rows": rows,
            "agreement": {"qatdist_int8": ok, "ort_int8": ok},
            "skipped": {"openvino_int8": "package(s) openvino not installed (pip ...)"},
            "hung": {},
        }

    monkeypatch.setattr(peers, "peer_latency", fake)
    script = _load_script(monkeypatch)
    out = tmp_path / "peers.json"
    assert script.main(["--peers", "--models", "resnet18", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert tuple(results) == script.PEER_JSON_KEYS
    assert results["int8_vs_best_peer"] == {"resnet18": {"1": 2.0, "32": 2.0}}
    assert results["int8_vs_best_peer_geomean"] == {"1": 2.0, "32": 2.0}
    assert results["fastest_qatdist_artifact"] == {
        "resnet18": {"1": "qatdist_int8", "32": "qatdist_int8"}
    }
    printed = capsys.readouterr().out
    assert "openvino_int8: could not run: package(s) openvino not installed" in printed
    assert "| resnet18 | 1 | 2.00 | - | 1.00 | - | - | 2.00 |" in printed


def test_bench_peers_times_the_segmenter_at_its_frame_outside_the_classifier_geomean(
    monkeypatch, tmp_path, capsys
):
    asked = {}

    def fake(name, **kwargs):
        asked[name] = (kwargs["image_size"], kwargs["batch_sizes"])
        ratio = 0.5 if name in peers.SEGMENTATION_MODELS else 2.0
        rows = [
            {
                "batch_size": b,
                "ms": {"qatdist_int8": ratio * b, "openvino_int8": 1.0 * b},
                "int8_vs_best_peer": ratio,
                "fastest_qatdist": "qatdist_int8",
            }
            for b in kwargs["batch_sizes"]
        ]
        return {"rows": rows, "agreement": {}, "skipped": {}, "hung": {}}

    monkeypatch.setattr(peers, "peer_latency", fake)
    script = _load_script(monkeypatch)
    out = tmp_path / "peers.json"
    models = "resnet18,lraspp_mobilenet_v3_large"
    assert script.main(["--peers", "--models", models, "--json", str(out)]) == 0
    assert asked == {
        "resnet18": ((224, 224), script.PEER_BATCH_SIZES),
        "lraspp_mobilenet_v3_large": (script.SEGMENTER_FRAME, script.SEGMENTER_BATCH_SIZES),
    }
    results = json.loads(out.read_text())
    assert results["int8_vs_best_peer"]["lraspp_mobilenet_v3_large"] == {"1": 0.5, "8": 0.5}
    assert results["int8_vs_best_peer_geomean"] == {"1": 2.0, "32": 2.0}  # classifiers only
    assert "lraspp_mobilenet_v3_large: latency (ms, interleaved medians), 360x480" in (
        capsys.readouterr().out
    )
    # Without --peers a segmenter has no figure to be measured for.
    assert script.main(["--models", "lraspp_mobilenet_v3_large"]) == 2
    assert "measured by --peers only" in capsys.readouterr().err


def test_a_segmenter_runs_through_qatdists_openvino_ir_and_nncf():
    """lraspp_mobilenet_v3_large's per-pixel logits on CamVid frames at 96x128: qatdist's IR
    (captured with dynamic height and width) and NNCF's int8 both run every convolution as an
    int8 kernel and stay within the int8 bound of eager fp32."""
    require(
        importlib.util.find_spec("openvino") is not None
        and importlib.util.find_spec("nncf") is not None,
        "OpenVINO / NNCF not installed (the optional `peers` extra: pip install -e '.[peers]')",
    )
    require_shared(CAMVID)
    result = peers.peer_latency(
        "lraspp_mobilenet_v3_large",
        batch_sizes=(2,),
        image_size=(96, 128),
        calib_batches=2,
        calib_batch_size=4,
        rounds=1,
        per_round=2,
        stacks=("qatdist_int8_openvino", "openvino_int8"),
        frames=str(CAMVID / "val" / "images"),
    )
    assert result["skipped"] == {} and result["image_size"] == [96, 128]
    for stack in ("qatdist_int8_openvino", "openvino_int8"):
        judged = result["agreement"][stack]
        assert judged["ok"], judged
        int8, convolutions = judged["int8_kernels"]
        assert convolutions == 66 and int8 >= 60, judged
    assert result["agreement"]["qatdist_int8_openvino"]["int8_kernels"] == [66, 66]
    assert all(v > 0 for v in result["rows"][0]["ms"].values())


def test_each_stack_runs_in_its_own_process_and_is_judged_before_timing():
    """Without the peers: Inductor fp32 of a small resnet18 built, judged and timed in a
    process of its own; an unknown stack is refused before any process starts."""
    result = peers.peer_latency(
        "resnet18",
        batch_sizes=(1, 2),
        image_size=32,
        calib_batches=2,
        calib_batch_size=4,
        rounds=2,
        per_round=2,
        stacks=("inductor_fp32",),
    )
    assert result["skipped"] == {}
    assert result["agreement"]["inductor_fp32"]["rel_error"] < peers.FP32_REL_ERROR_BOUND
    assert [row["batch_size"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert set(row["ms"]) == {"inductor_fp32"} and row["ms"]["inductor_fp32"] > 0
        assert row["int8_vs_best_peer"] is None and row["fastest_qatdist"] is None
    with pytest.raises(ValueError, match="unknown stack"):
        peers.peer_latency("resnet18", stacks=("tensorrt_int8",))


def test_openvino_stacks_run_on_a_small_model():
    """OpenVINO fp32, NNCF int8 and qatdist's OpenVINO IR of resnet18 at 64x64: outputs within
    the bounds, every convolution and the linear an int8 kernel at run time, positive
    latencies, qatdist's IR compared with NNCF's int8."""
    require(
        importlib.util.find_spec("openvino") is not None
        and importlib.util.find_spec("nncf") is not None,
        "OpenVINO / NNCF not installed (the optional `peers` extra: pip install -e '.[peers]')",
    )
    result = peers.peer_latency(
        "resnet18",
        batch_sizes=(2,),
        image_size=64,
        calib_batches=4,
        calib_batch_size=8,
        rounds=1,
        per_round=2,
        stacks=("openvino_fp32", "openvino_int8", "qatdist_int8_openvino"),
    )
    assert result["skipped"] == {}
    assert result["agreement"]["openvino_fp32"]["ok"]
    for int8 in ("openvino_int8", "qatdist_int8_openvino"):
        assert result["agreement"][int8]["ok"]
        assert result["agreement"][int8]["int8_kernels"] == [21, 21]
    assert result["agreement"]["openvino_fp32"]["int8_kernels"][0] == 0
    ms = result["rows"][0]["ms"]
    assert set(ms) == {"openvino_fp32", "openvino_int8", "qatdist_int8_openvino"}
    assert all(math.isfinite(v) and v > 0 for v in ms.values())
    row = result["rows"][0]
    assert row["fastest_qatdist"] == "qatdist_int8_openvino"
    assert row["int8_vs_best_peer"] == pytest.approx(
        ms["qatdist_int8_openvino"] / ms["openvino_int8"]
    )


def _serve_hanging_or_failing(conn, stack: str, settings: dict) -> None:
    """Stands in for `peers._serve_stack`: qatdist's Inductor stack fails to build; ORT builds
    but never answers a request; the fp32 stack answers like a real one (in microseconds)."""
    if stack == "qatdist_int8":
        conn.send(("failed", "RuntimeError: no int8 kernel"))
        return
    ok = {"rel_error": 0.0, "bound": peers.FP32_REL_ERROR_BOUND, "ok": True, "top1_agreement": 1}
    conn.send(("ready", {"agreement": ok, "build_s": 0.0, "first_s": 0.0}))
    while (request := conn.recv())[0] != "stop":
        if stack == "ort_int8":
            time.sleep(3600)
        conn.send(("warm", None) if request[0] == "warm" else ("times", [1.0] * request[2]))


@pytest.fixture
def fake_stacks(monkeypatch):
    monkeypatch.setattr(peers, "_serve_stack", _serve_hanging_or_failing)
    monkeypatch.setattr(peers, "missing_packages", lambda stacks: {})
    # The deadline is what is tested: a healthy stack answers a request in microseconds.
    return dict(batch_sizes=(1,), rounds=2, per_round=2, call_deadline_s=10.0)


def test_a_hanging_peer_is_stopped_at_its_deadline_and_reported(fake_stacks):
    """The hung stack's process is killed and listed in `hung`; the others are timed."""
    result = peers.peer_latency("resnet18", stacks=("ort_int8", "inductor_fp32"), **fake_stacks)
    assert result["hung"] == {"ort_int8": "at batch 1: no reply within 10 s; stopped"}
    assert "ort_int8" not in result["skipped"]
    assert result["rows"][0]["ms"] == {"inductor_fp32": 1.0}


def test_qatdists_own_stack_failing_is_an_error_not_a_skipped_row(fake_stacks):
    with pytest.raises(peers.QatdistStackError, match="qatdist_int8 failed: build failed: Runt"):
        peers.peer_latency("resnet18", stacks=("inductor_fp32", "qatdist_int8"), **fake_stacks)


def test_bench_peers_reports_a_hung_stack_and_exits_non_zero_when_qatdist_fails(
    monkeypatch, tmp_path, capsys
):
    def hung(name, **kwargs):
        return {"rows": [], "agreement": {}, "skipped": {}, "hung": {"ort_int8": "no reply"}}

    monkeypatch.setattr(peers, "peer_latency", hung)
    script = _load_script(monkeypatch)
    out = tmp_path / "peers.json"
    assert script.main(["--peers", "--models", "resnet18", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["peer_hung"] == {"resnet18": {"ort_int8": "no reply"}}
    assert "ort_int8: stopped: no reply" in capsys.readouterr().out

    def failing(name, **kwargs):
        raise peers.QatdistStackError(f"{name}: qatdist's stack qatdist_int8 failed: boom")

    monkeypatch.setattr(peers, "peer_latency", failing)
    assert script.main(["--peers", "--models", "resnet18", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "bench.py: resnet18: qatdist's stack qatdist_int8 failed: boom" in captured.err
