"""scripts/segmentation_table.py: the CamVid tables from three run folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.fixture
def table():
    spec = importlib.util.spec_from_file_location(
        "segmentation_table", ROOT / "scripts" / "segmentation_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _values(miou: float) -> dict:
    return {"miou": miou, "pixel_accuracy": 0.9, "iou_pole": miou / 2, "iou_bicyclist": 0.25}


def _run(folder: Path, **report) -> Path:
    (folder / "final").mkdir(parents=True)
    (folder / "resolved_config.toml").write_text(
        "[task]\ncrop_size = [256, 256]\neval_size = [360, 480]\n"
    )
    base = {
        "task": "segmentation",
        "model": "lraspp_mobilenet_v3_large",
        "steps": 100,
        "world_size": 2,
        "cpu_model": "AMD EPYC",
        "cpu_int8_capabilities": {"avx512_vnni": True},
        "torch_version": "2.14.1",
        "torchao_version": "0.18.0",
        "latency": [],
    }
    (folder / "final" / "report.json").write_text(json.dumps(base | report))
    return folder


def test_tables_from_three_runs(table, tmp_path, capsys):
    fp32 = _run(tmp_path / "fp32", fp32_metric_values=_values(0.60), fp32_miou=0.60)
    qat = _run(
        tmp_path / "qat",
        start_fp32_metric_values=_values(0.58),
        ptq_int8_metric_values=_values(0.55),
        ptq_int8_miou=0.55,
        fp32_fake_quant_miou=0.594,
        int8_reference_metric_values=_values(0.593),
        int8_metric_values=_values(0.592),
        int8_miou=0.592,
        int8_target="vnni",
        latency=[
            {"batch_size": 1, "int8_ms": 50.0, "fp32_ms": 100.0},
            {"batch_size": 8, "int8_ms": 300.0, "fp32_ms": 900.0},
        ],
    )
    control = _run(tmp_path / "control", fp32_metric_values=_values(0.6), fp32_miou=0.6)
    peers = tmp_path / "peers.json"
    peers.write_text(
        json.dumps(
            {
                "peer_latency_ms": {"lraspp_mobilenet_v3_large": {"1": {"openvino_int8": 40.0}}},
                "int8_vs_best_peer": {"lraspp_mobilenet_v3_large": {"1": 1.25, "8": None}},
            }
        )
    )
    args = ["--fp32", str(fp32), "--qat", str(qat), "--control", str(control)]
    assert table.main([*args, "--peers", str(peers)]) == 0
    out = capsys.readouterr().out
    assert "| PTQ int8 of those weights | QAT run, step 0 | 55.00 | 90.00 | 27.50 |" in out
    assert "| fp32 (the fp32 run's final weights) | QAT run, step 0 | 58.00 |" in out
    assert "vs the fp32 control: -0.80 mIoU points" in out  # 59.2 - 60.0
    assert "vs PTQ int8: +4.20 points" in out
    assert "| 1 | 50.0 | 100.0 | 40.0 | 0.50 |" in out  # int8, fp32, the bench's OpenVINO
    assert "| 8 | 300.0 | 900.0 | - | 0.33 |" in out
    assert "batch 1: 1.25" in out


def test_a_run_without_a_report_is_named(table, tmp_path, capsys):
    fp32 = _run(tmp_path / "fp32", fp32_miou=0.6)
    args = ["--fp32", str(fp32), "--qat", str(tmp_path / "nothing"), "--control", str(fp32)]
    assert table.main(args) == 2
    assert f"{tmp_path / 'nothing'}: no final/report.json" in capsys.readouterr().err
