"""The files a finished run writes into `final/` (`ARTIFACTS`): built in a staging folder that
replaces the old one only when complete (`staged_output`), the int8 program, its AOTInductor
package and OpenVINO IR, the reference inputs and predictions, and the report's views."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.export import Dim

from qatdist.finish import openvino_ir
from qatdist.finish.checks import FinalCheckFailed
from qatdist.quant import target as quant_target
from qatdist.run import report as reports
from qatdist.tasks import Task

log = logging.getLogger(__name__)

ARTIFACTS = (
    "model_int8.pt2",
    "model_int8_aoti.pt2",
    openvino_ir.XML,
    openvino_ir.BIN,
    "reference_io.pt",
    "val_reference.pt",
    "report.json",
    "report.md",
    "latency.png",
)


def aoti_package_source(package: Path) -> str:
    """The generated C++ wrapper source(s) inside an AOTInductor package, concatenated."""
    with zipfile.ZipFile(package) as archive:
        return "\n".join(
            archive.read(name).decode(errors="replace")
            for name in archive.namelist()
            if name.endswith("wrapper.cpp")
        )


def export_int8(
    int8_model: torch.nn.Module, example: torch.Tensor, path: Path
) -> torch.export.ExportedProgram:
    """Save the converted model with a dynamic batch dimension (`torch.export.save`, its
    `quant.target` in the metadata) and return the exported program. Load it with
    `qatdist.quant.load_int8`: `torch.export.load` after a plain `import torchao` runs it, but
    compiles it to fp32 kernels."""
    batch = Dim("batch", min=1, max=65536)
    exported = torch.export.export(int8_model, (example,), dynamic_shapes=({0: batch},))
    extra_files = quant_target.metadata(quant_target.target_of(exported.graph))
    torch.export.save(exported, str(path), extra_files=extra_files)
    return exported


def build_aoti_package(exported: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile `exported` ahead of time into an AOTInductor package at `path`.

    Freezing goes through `inductor_configs` under `no_grad`: without it the quantized Linear
    layers silently stay fp32 (ao#4566). Loads with `torch._inductor.aoti_load_package`.
    """
    with torch.no_grad():
        built = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(path), inductor_configs={"freezing": True}
        )
    return Path(built)


def openvino_artifact(
    prepared: torch.nn.Module, example: torch.Tensor, stage: Path
) -> tuple[Callable, dict]:
    """Write the OpenVINO IR into `stage`, compile it (the process's torch thread count) and
    check that its runtime model runs int8 kernels. Returns its forward and report fields."""
    log.info("writing the OpenVINO IR (convert_pt2e without weight folding)")
    start = time.perf_counter()
    openvino_ir.export_ir(prepared, example, stage / openvino_ir.XML)
    compiled = openvino_ir.compile_model(stage / openvino_ir.XML, torch.get_num_threads())
    int8, total = openvino_ir.int8_kernels(compiled)
    if int8 == 0:
        raise FinalCheckFailed(
            f"OpenVINO runs none of the IR's {total} convolution/linear layers as an int8 kernel: "
            "the FakeQuantize nodes were not fused; nothing was written"
        )
    seconds = time.perf_counter() - start
    fields = {"openvino_int8_kernels": [int8, total], "openvino_export_seconds": seconds}
    return openvino_ir.forward(compiled), fields


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to build the artifacts in. On success its files
    replace those in `out_dir` (created if missing; artifacts of an earlier export that this one
    did not produce are removed); on failure it is deleted and `out_dir` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if not out_dir.exists():
            os.rename(stage, out_dir)
            return
        for name in ARTIFACTS:
            if not (stage / name).exists() and (out_dir / name).is_file():
                (out_dir / name).unlink()
        for entry in stage.iterdir():
            os.replace(entry, out_dir / entry.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_program_and_reference(
    int8_model: torch.nn.Module, task: Task, example: torch.Tensor, stage: Path
) -> torch.export.ExportedProgram:
    """Write model_int8.pt2 and reference_io.pt (`example` and the converted model's
    predictions for it, `task.predictions`, under "logits")."""
    with torch.no_grad():
        logits = task.predictions(int8_model(example))
    exported = export_int8(int8_model, example, stage / "model_int8.pt2")
    torch.save({"input": example, "logits": logits}, stage / "reference_io.pt")
    return exported


def write_views(stage: Path, full: dict, rows: list[dict], batch_sizes: list[int]) -> None:
    (stage / "report.json").write_text(json.dumps(full, indent=2))
    (stage / "report.md").write_text(reports.markdown(full))
    eager = "compiled" if full["compiled"] else "eager"
    series = {
        label: [row[key] for row in rows]
        for label, key in (
            (f"fp32 {eager}", "fp32_ms"),
            (f"int8 {eager}", "int8_ms"),
            ("int8 AOTI", "int8_aoti_ms"),
            ("int8 OpenVINO", "int8_openvino_ms"),
        )
        if key in rows[-1]
    }
    reports.latency_png(stage / "latency.png", batch_sizes, series)
