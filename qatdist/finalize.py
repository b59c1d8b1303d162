"""The end of a run: convert, compile with freezing, evaluate, benchmark, save the artifacts.

One implementation for the trainer's last step (rank 0, `Trainer.finish`) and for
`scripts/export_final.py` (`qatdist.export`). Files written into `out_dir`:

    model_int8.pt2        the converted model, `torch.export.save`, dynamic batch dimension
    model_int8_aoti.pt2   AOTInductor package built with freezing (when `aoti=True`)
    reference_io.pt       an input batch and the converted model's logits for it
    val_reference.pt      the first validation samples: images, labels, converted model's logits
    report.json, report.md, latency.png

Everything is built in a temporary folder beside `out_dir` and moved into place at the end,
so a failure part-way leaves `out_dir` as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torchao
import torchvision
from torch._inductor.utils import run_and_get_code
from torch.export import Dim

from qatdist import report as report_views
from qatdist.evaluate import pad_batch, side_by_side_latency_ms
from qatdist.quant.convert import compile_for_inference, convert_to_int8

log = logging.getLogger(__name__)

ARTIFACTS = (
    "model_int8.pt2",
    "model_int8_aoti.pt2",
    "reference_io.pt",
    "val_reference.pt",
    "report.json",
    "report.md",
    "latency.png",
)
# Calls of the oneDNN int8 kernels in Inductor's Python wrapper (`torch.ops.onednn.qconv_...(`)
# and in AOTInductor's C++ wrapper (`aoti_torch_cpu__qconv_...(`), as torch 2.14 writes them:
# qconv_pointwise, qconv2d_pointwise.binary (conv + add), qlinear_pointwise(.binary).
_QUANTIZED_CALL = re.compile(
    r"(?:torch\.ops\.onednn\.|aoti_torch_cpu__)q(conv|linear)\w*(?:\.\w+)?\("
)


def count_quantized_ops(code: str) -> dict[str, int]:
    """Quantized convolution and linear kernel calls in generated (Python or C++) code."""
    counts = {"conv": 0, "linear": 0}
    for match in _QUANTIZED_CALL.finditer(code):
        counts[match.group(1)] += 1
    return counts


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
    """Save the converted model with a dynamic batch dimension (`torch.export.save`) and return
    the exported program; it loads with `torch.export.load` in any process that imports torchao
    (which registers the quantized ops)."""
    batch = Dim("batch", min=1, max=65536)
    exported = torch.export.export(int8_model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(path))
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


def layer_counts(model: torch.nn.Module) -> dict[str, int]:
    """Convolution and linear modules of an eager fp32 model, to compare the lowered counts to."""
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    modules = list(model.modules())
    return {
        "fp32_conv_layers": sum(isinstance(m, convs) for m in modules),
        "fp32_linear_layers": sum(isinstance(m, torch.nn.Linear) for m in modules),
    }


def machine_facts() -> dict:
    """Versions, CPU model and torch thread count, for the report."""
    return {
        "torch_version": torch.__version__,
        "torchao_version": torchao.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "cpu_model": report_views.cpu_model(),
        "threads": torch.get_num_threads(),
    }


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


def _compare_on_val(
    reference: Callable[[torch.Tensor], torch.Tensor],
    forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batches: Iterable,
    *,
    pad_to: int,
    keep: int,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Top-1 of `reference` and each of `forwards` over `batches`, and each forward's top-1
    agreement with `reference` and max |logit difference|. Batches are zero-padded to `pad_to`
    (static-shape compiled models see one batch size). Returns the measures and the first
    `keep` samples' images, labels and reference logits."""
    correct = dict.fromkeys(["reference", *forwards], 0)
    agree = dict.fromkeys(forwards, 0)
    max_diff = dict.fromkeys(forwards, 0.0)
    kept: dict[str, list[torch.Tensor]] = {"images": [], "labels": [], "logits": []}
    seen = 0
    with torch.no_grad():
        for batch in batches:
            images, labels = batch[0], batch[1]
            n = images.shape[0]
            if n == 0:
                continue
            padded = pad_batch(images, pad_to)
            ref_logits = reference(padded)[:n]
            ref_top = ref_logits.argmax(dim=1)
            correct["reference"] += int((ref_top == labels).sum())
            for name, forward in forwards.items():
                logits = forward(padded)[:n]
                top = logits.argmax(dim=1)
                correct[name] += int((top == labels).sum())
                agree[name] += int((top == ref_top).sum())
                max_diff[name] = max(max_diff[name], float((logits - ref_logits).abs().max()))
            take = min(n, keep - seen) if seen < keep else 0
            if take:
                kept["images"].append(images[:take].clone())
                kept["labels"].append(labels[:take].clone())
                kept["logits"].append(ref_logits[:take].clone())
            seen += n
    measures = {
        "seen": seen,
        "top1": {k: v / seen if seen else 0.0 for k, v in correct.items()},
        "agreement": {k: v / seen if seen else 0.0 for k, v in agree.items()},
        "max_abs_logit_diff": max_diff,
    }
    return measures, {k: torch.cat(v) if v else torch.empty(0) for k, v in kept.items()}


def finalize(
    prepared: torch.nn.Module,
    fp32_model: torch.nn.Module,
    val_batches: Callable[[int], Iterable],
    *,
    image_size: int,
    batch_sizes: list[int],
    latency_iters: int,
    out_dir: Path,
    compile_model: bool = True,
    aoti: bool = True,
    report: dict | None = None,
    reference_samples: int = 256,
) -> dict:
    """Convert `prepared` (a QAT model in eval mode, observers off), evaluate and benchmark it,
    and write the artifacts listed in the module docstring into `out_dir`.

    `fp32_model` (same architecture) is the latency baseline, compiled alike. `val_batches(n)`
    yields (images, labels, ...) batches of at most n validation samples. Accuracy is measured
    at the largest of `batch_sizes`, latency (`latency_iters` timed runs, interleaved) at each.
    With `compile_model=False` the eager models are measured and no AOTI package is built;
    `aoti=False` skips only the AOTI package. `report` holds the caller's fields (model, steps,
    fp32_fake_quant_top1, ...), merged into report.json. Returns the full report.

    The single-batch fields `int8_latency_ms`, `fp32_latency_ms`, `int8_speedup` are those of
    `latency_batch_size`, the largest batch size.
    """
    batch_sizes = sorted(set(batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch_sizes: expected positive integers, got {batch_sizes}")
    main_batch = batch_sizes[-1]
    aoti = aoti and compile_model
    fp32_model = fp32_model.eval()
    full = dict(report or {})
    full |= layer_counts(fp32_model)

    with staged_output(out_dir) as stage:
        int8_model = convert_to_int8(prepared)
        generator = torch.Generator().manual_seed(0)
        examples = {
            b: torch.randn(b, 3, image_size, image_size, generator=generator) for b in batch_sizes
        }
        with torch.no_grad():
            reference_logits = int8_model(examples[main_batch])
        exported = export_int8(int8_model, examples[main_batch], stage / "model_int8.pt2")
        torch.save(
            {"input": examples[main_batch], "logits": reference_logits},
            stage / "reference_io.pt",
        )

        forwards: dict[str, Callable] = {}
        quantized_ops: dict[str, dict[str, int]] = {}
        compile_s = aoti_s = 0.0
        if compile_model:
            log.info("compiling int8 and fp32 models with Inductor (freezing)")
            start = time.perf_counter()
            int8_forward = compile_for_inference(int8_model)
            fp32_forward = compile_for_inference(fp32_model)
            with torch.no_grad():  # first calls compile, once per batch size (static shapes)
                # run_and_get_code resets Dynamo's caches first: it must be the first compile.
                _, codes = run_and_get_code(int8_forward, examples[main_batch])
                for b in batch_sizes:
                    int8_forward(examples[b])
                    fp32_forward(examples[b])
            compile_s = time.perf_counter() - start
            quantized_ops["inductor"] = count_quantized_ops("\n".join(codes))
            forwards = {"fp32": fp32_forward, "int8": int8_forward}
        else:
            forwards = {"fp32": fp32_model, "int8": int8_model}
        if aoti:
            log.info("building the AOTInductor package (freezing)")
            start = time.perf_counter()
            package = build_aoti_package(exported, stage / "model_int8_aoti.pt2")
            aoti_s = time.perf_counter() - start
            quantized_ops["aoti"] = count_quantized_ops(aoti_package_source(package))
            forwards["int8_aoti"] = torch._inductor.aoti_load_package(str(package))

        measured = {k: v for k, v in forwards.items() if k != "fp32"}
        measures, kept = _compare_on_val(
            int8_model, measured, val_batches(main_batch), pad_to=main_batch, keep=reference_samples
        )
        torch.save(
            {"images": kept["images"], "labels": kept["labels"], "logits": kept["logits"]},
            stage / "val_reference.pt",
        )

        rows = []
        for b in batch_sizes:
            ms = side_by_side_latency_ms(forwards, examples[b], latency_iters)
            row = {"batch_size": b}
            for name, value in ms.items():
                row[f"{name}_ms"] = value
                row[f"{name}_images_per_s"] = b * 1000.0 / value
            row["int8_speedup"] = ms["fp32"] / ms["int8"]
            if "int8_aoti" in ms:
                row["int8_aoti_speedup"] = ms["fp32"] / ms["int8_aoti"]
            rows.append(row)
        main_row = rows[-1]

        full |= {
            "int8_top1": measures["top1"]["int8"],
            "int8_reference_top1": measures["top1"]["reference"],
            "int8_eval_samples": measures["seen"],
            "int8_compiled_agreement": measures["agreement"]["int8"],
            "int8_compiled_max_abs_logit_diff": measures["max_abs_logit_diff"]["int8"],
            "int8_latency_ms": main_row["int8_ms"],
            "fp32_latency_ms": main_row["fp32_ms"],
            "int8_speedup": main_row["int8_speedup"],
            "latency_batch_size": main_batch,
            "latency_iters": latency_iters,
            "latency": rows,
            "compiled": compile_model,
            "compile_seconds": compile_s,
            "quantized_ops": quantized_ops,
            "quantized_conv_count": quantized_ops.get("inductor", {}).get("conv"),
            "quantized_linear_count": quantized_ops.get("inductor", {}).get("linear"),
        }
        if aoti:
            full |= {
                "int8_aoti_top1": measures["top1"]["int8_aoti"],
                "int8_aoti_agreement": measures["agreement"]["int8_aoti"],
                "int8_aoti_max_abs_logit_diff": measures["max_abs_logit_diff"]["int8_aoti"],
                "aoti_build_seconds": aoti_s,
            }
        full |= machine_facts()

        (stage / "report.json").write_text(json.dumps(full, indent=2))
        (stage / "report.md").write_text(report_views.markdown(full))
        series = {
            label: [row[key] for row in rows]
            for label, key in (
                ("fp32 compiled" if compile_model else "fp32 eager", "fp32_ms"),
                ("int8 compiled" if compile_model else "int8 eager", "int8_ms"),
                ("int8 AOTI", "int8_aoti_ms"),
            )
            if key in main_row
        }
        report_views.latency_png(stage / "latency.png", batch_sizes, series)
    return full
