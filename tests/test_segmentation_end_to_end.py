"""`task.name = "segmentation"` end to end: a 2-rank QAT run over gloo on the downscaled CamVid
slice (shards written by the segmentation mode of scripts/make_shards.py), with the UNet of
tests/seg_unet.py, to a compiled int8 segmenter and its report; then scripts/export_final.py
on that run folder (pt2, AOTI and, where installed, OpenVINO)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, torchrun

from qatdist.quant import load_int8

UNET = str(Path(__file__).resolve().parent / "seg_unet.py") + ":unet"
CAMVID_NAMES = [
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign/symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
]
SIZE_GUIDANCE = {k: 0 for k in ("scalars", "images", "tensors")}


FULL_FRAME = (48, 64)  # the slice's full frame (task.eval_size)


@pytest.fixture(scope="module")
def seg_run(camvid_tiny: dict, tmp_path_factory) -> dict:
    """The 2-rank QAT run of the UNet on the CamVid slice, once for this module."""
    out = tmp_path_factory.mktemp("seg") / "run"
    result = torchrun(
        [
            f"--run.out_dir={out}",
            "--task.name=segmentation",
            "--task.ignore_index=11",
            "--task.crop_size=[32, 32]",
            "--task.scale_range=[0.75, 1.25]",
            "--task.eval_size=[48, 64]",  # the slice's full frame: latency measured there
            "--task.class_weighting=median_frequency",
            f"--task.class_names={json.dumps(CAMVID_NAMES)}",
            f"--model.name={UNET}",
            "--data.num_classes=11",
            "--data.image_size=32",
            f"--data.train_shards={camvid_tiny['train_shards']}",
            f"--data.val_shards={camvid_tiny['val_shards']}",
            "--data.generate_demo=false",
            "--train.batch_size=2",
            "--train.epochs=1",
            "--train.steps_per_epoch=4",
            "--train.log_every_steps=2",
            "--train.eval_every_epochs=1",
            "--log.val_frames=3",
            "--train.distill_weight=0.3",
            "--quant.sync_every_steps=2",
            "--quant.fake_quant_start_step=1",
            "--quant.ptq_calibration_batches=2",
            "--runtime.latency_batch_size=2",
            "--runtime.latency_batch_sizes=[1]",  # frame by frame too
            "--runtime.latency_iters=2",
        ],
        cwd=ROOT,
    )
    return {"out": out, "result": result}


@pytest.mark.slow
def test_two_ranks_to_a_compiled_int8_segmenter(seg_run: dict) -> None:
    out, result = seg_run["out"], seg_run["result"]
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "final" / "report.json").read_text())
    assert report["task"] == "segmentation" and report["metric"] == "miou"
    for baseline in ("fp32", "fp32_fake_quant", "ptq_fp32", "ptq_int8", "int8", "int8_reference"):
        assert 0.0 <= report[f"{baseline}_miou"] <= 1.0, baseline
    assert "int8_top1" not in report
    values = report["int8_metric_values"]
    assert values["miou"] == report["int8_miou"]
    assert 0.0 <= values["pixel_accuracy"] <= 1.0
    assert any(key.startswith("iou_") for key in values)
    for baseline in ("fp32", "ptq_fp32", "ptq_int8"):  # the baselines' per-class IoU too
        baseline_values = report[f"{baseline}_metric_values"]
        assert baseline_values["miou"] == report[f"{baseline}_miou"], baseline
        assert set(baseline_values) == set(values), baseline
    assert report["quantization_complete"] is True
    assert report["quantized_conv_count"] == 6  # every convolution of the UNet
    assert report["int8_eval_samples"] == 4
    assert [row["batch_size"] for row in report["latency"]] == [1, 2]
    assert report["latency_batch_size"] == 2  # the headline figures: the largest batch
    assert report["int8_compiled_comparable_samples"] > 0
    assert report["qat_gain_over_ptq"] == pytest.approx(
        report["int8_miou"] - report["ptq_int8_miou"]
    )
    # The saved int8 program runs a full frame at another batch size.
    program = load_int8(out / "final" / "model_int8.pt2").module()
    with torch.no_grad():
        logits = program(torch.randn(3, 3, 48, 64))
    logits = logits["out"] if isinstance(logits, dict) else logits
    assert logits.shape == (3, 11, 48, 64)

    # TensorBoard: the first 3 val frames, their label maps and both models' predictions as
    # pictures of the frame's size, at the evaluation and at the end; every metric value.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    pictures = ("image", "ground_truth", "fp32_prediction", "int8_prediction")
    expected = {f"{p}/frame{k}/{n}" for p in ("eval", "final") for k in range(3) for n in pictures}
    images = set(acc.Tags()["images"])
    assert expected <= images and not any("frame3" in tag for tag in images)
    for tag in expected:
        event = acc.Images(tag)[-1]
        assert (event.height, event.width, event.step) == (48, 64, 4), tag
    legend = acc.Tensors("eval/frames_legend/text_summary")[0].tensor_proto.string_val[0]
    assert "| 6 | sign/symbol | (192, 128, 128) #c08080 |" in legend.decode()
    scalars = set(acc.Tags()["scalars"])
    for prefix in ("eval/fake_quant", "eval/int8"):
        assert {f"{prefix}_miou", f"{prefix}_pixel_accuracy"} <= scalars
        assert any(tag.startswith(f"{prefix}_iou_") for tag in scalars), prefix
    for key, value in values.items():
        assert acc.Scalars(f"final/int8_{key}")[-1].value == pytest.approx(value), key
    per_class = set(values) - {"miou", "pixel_accuracy"}
    assert per_class and per_class <= {"iou_" + n.replace("/", "_") for n in CAMVID_NAMES}


def openvino_formats() -> list[str]:
    """["openvino"] where the optional package is installed; [] otherwise, except under CI=true
    where its absence fails the test (CI never passes by leaving a format out)."""
    if importlib.util.find_spec("openvino") is not None:
        return ["openvino"]
    if os.environ.get("CI") == "true":
        pytest.fail("needs the openvino package (pip install -e '.[peers]'); CI=true runs it")
    return []


@pytest.mark.slow
def test_export_final_on_the_segmenter(seg_run: dict, tmp_path: Path) -> None:
    assert seg_run["result"].returncode == 0, seg_run["result"].stderr[-4000:]
    run_dir, out = seg_run["out"], tmp_path / "export"
    formats = ["pt2", "aoti", *openvino_formats()]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_final.py"), f"--run-dir={run_dir}"]
        + [f"--out={out}", "--batch-sizes=1,8", f"--formats={','.join(formats)}", "--iters=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    trainer = json.loads((run_dir / "final" / "report.json").read_text())
    assert report["task"] == "segmentation" and report["formats"] == formats
    # The same checkpoint converted again scores what the trainer's own final model scored.
    for baseline in ("fp32", "fp32_fake_quant", "int8_reference", "int8"):
        assert report[f"{baseline}_miou"] == trainer[f"{baseline}_miou"], baseline
    assert report["quantized_conv_count"] == 6 and report["quantization_complete"] is True
    # int8 and fp32 latency at the full frame, batch 1 and 8 (the examples are the timed inputs).
    assert [row["batch_size"] for row in report["latency"]] == [1, 8]
    for row in report["latency"]:
        assert row["int8_ms"] > 0 and row["fp32_ms"] > 0 and row["int8_aoti_ms"] > 0
    example = torch.load(out / "reference_io.pt")["input"]
    assert tuple(example.shape) == (8, 3, *FULL_FRAME)
    assert report["int8_aoti_agreement"] >= 0.99
    # Each artifact answers a full frame at a batch size it was not exported with.
    frames = torch.randn(3, 3, *FULL_FRAME)
    program = load_int8(out / "model_int8.pt2").module()
    aoti = torch._inductor.aoti_load_package(str(out / "model_int8_aoti.pt2"))
    with torch.no_grad():
        assert program(frames).shape == aoti(frames).shape == (3, 11, *FULL_FRAME)
    if "openvino" in formats:
        from qatdist.finish import openvino_ir

        assert report["openvino_int8_kernels"] == [6, 6]  # every convolution in int8
        assert report["int8_openvino_agreement"] >= 0.99
        compiled = openvino_ir.compile_model(out / openvino_ir.XML, threads=1)
        assert openvino_ir.forward(compiled)(frames).shape == (3, 11, *FULL_FRAME)
