"""The end of a run: convert, compile with freezing, evaluate, benchmark, save the artifacts.

One implementation for the trainer's last step (rank 0, `Trainer.finish`) and for
`scripts/export_final.py` (`qatdist.finish.export`). Files written into `out_dir`:

    model_int8.pt2        the converted model, `torch.export.save`, dynamic batch dimension;
                          load it with `qatdist.quant.load_int8` so a compile uses int8 kernels
    model_int8_aoti.pt2   AOTInductor package built with freezing (when `aoti=True`)
    model_int8_openvino.xml, .bin
                          OpenVINO IR of the same prepared model (when `openvino=True`;
                          `qatdist.finish.openvino_ir`), checked to run int8 kernels
    reference_io.pt       an input batch and the converted model's logits for it
    val_reference.pt      the first validation samples: images, labels, converted model's logits
    report.json, report.md, latency.png

Everything is built in a temporary folder beside `out_dir` and moved into place at the end,
so a failure part-way leaves `out_dir` as it was. The report's keys are defined in
`qatdist.run.report`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
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

from qatdist.finish import openvino_ir
from qatdist.quant import inspect as quant_inspect
from qatdist.quant import target as quant_target
from qatdist.quant.convert import compile_for_inference, convert_to_int8
from qatdist.run import report as reports
from qatdist.tasks.evaluate import DecidedAgreement, pad_batch, side_by_side_latency_ms
from qatdist.topology import cpu_int8_capabilities

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


class FinalCheckFailed(RuntimeError):
    """The model about to be written does not compute what it should: the int8 model answers
    one input differently on two calls, or the float eval graph differs from the eager model
    in eval mode. Nothing is written."""


def check_deterministic(model: Callable, images: torch.Tensor, what: str) -> None:
    """Raise FinalCheckFailed unless two calls of `model` on `images` agree exactly."""
    with torch.no_grad():
        first, second = model(images), model(images)
    if not torch.equal(first, second):
        diff = (first - second).abs().max().item()
        raise FinalCheckFailed(
            f"{what} answers the same input differently on two calls (max |difference| "
            f"{diff:.4g}): a random op is left in it"
        )


# Largest |compiled - converted| logit difference accepted, as a fraction of the converted
# model's largest |logit| over the validation set. The two compute the same int8 model and differ
# only where a float rounding flips an activation's int8 rounding: one quantization step, 1/255
# of that tensor's range (0.4%). Such flips, spread over the layers, measured 0.5-0.6% on
# resnet18 (docs/cpu_targets.md); 5% is about 13 steps of an 8-bit output range, ten times
# that. A saturated int16 sum (a CPU without int8 dot products, quant.target 'vnni') loses up to
# half of its value and measured 28% and more.
INT8_REL_LOGIT_DIFF_BOUND = 0.05


class Int8Disagreement(FinalCheckFailed):
    """The compiled int8 model's logits differ from the converted reference's by more than int8
    rounding explains (`INT8_REL_LOGIT_DIFF_BOUND`). Nothing is written."""


def check_int8_agreement(full: dict, capabilities: dict) -> None:
    """Raise Int8Disagreement when the compiled (or AOTI) int8 model's largest logit difference
    from the converted reference exceeds `INT8_REL_LOGIT_DIFF_BOUND` of the logits' scale; the
    message names the target and the CPU when the CPU is weaker than the target."""
    scale = full["int8_reference_logit_scale"]
    for prefix in ("int8_compiled", "int8_aoti"):
        diff = full.get(f"{prefix}_max_abs_logit_diff")
        if diff is None or diff <= INT8_REL_LOGIT_DIFF_BOUND * scale:
            continue
        target = full["int8_target"]
        cause = target is not None and quant_target.weaker_cpu_message(target, capabilities)
        raise Int8Disagreement(
            f"{prefix.removeprefix('int8_')} int8 logits differ from the converted reference by "
            f"{diff:.4g} ({diff / scale:.1%} of the logits' scale {scale:.4g}; rounding stays "
            f"within {INT8_REL_LOGIT_DIFF_BOUND:.0%})"
            + (f": the {cause}" if cause else "")
            + "; nothing was written"
        )


class QuantizationIncomplete(RuntimeError):
    """Annotated layers were left in float and the caller required full quantization."""


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


def _openvino_artifact(
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


def layer_counts(model: torch.nn.Module) -> dict[str, int]:
    """Convolution and linear layers of an eager fp32 model, to compare the lowered counts to.
    A MultiheadAttention's input projection is a linear held as a parameter, not a module (its
    output projection is an `nn.Linear` module)."""
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    modules = list(model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in modules)
    attention = sum(isinstance(m, torch.nn.MultiheadAttention) for m in modules)
    return {
        "fp32_conv_layers": sum(isinstance(m, convs) for m in modules),
        "fp32_linear_layers": linears + attention,
    }


def machine_facts() -> dict:
    """Versions, CPU model and int8 instructions, torch thread count, for the report."""
    return {
        "torch_version": torch.__version__,
        "torchao_version": torchao.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "cpu_model": reports.cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_int8_capabilities": cpu_int8_capabilities(),
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


def _save_program_and_reference(
    int8_model: torch.nn.Module, example: torch.Tensor, stage: Path
) -> torch.export.ExportedProgram:
    """Write model_int8.pt2 and reference_io.pt (`example` and the converted model's logits)."""
    with torch.no_grad():
        logits = int8_model(example)
    exported = export_int8(int8_model, example, stage / "model_int8.pt2")
    torch.save({"input": example, "logits": logits}, stage / "reference_io.pt")
    return exported


def _compare_on_val(
    reference: Callable[[torch.Tensor], torch.Tensor],
    forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batches: Iterable,
    *,
    pad_to: int,
    keep: int,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Top-1 of `reference` and each of `forwards` over `batches`, and each forward's
    margin-aware agreement with `reference` (`DecidedAgreement`: (agreeing, comparable)
    samples, max |logit difference|). Batches are zero-padded to `pad_to` (static-shape
    compiled models see one batch size). Returns the measures and the first `keep` samples'
    images, labels and reference logits."""
    correct = dict.fromkeys(["reference", *forwards], 0)
    logit_scale = 0.0
    agreement = {name: DecidedAgreement() for name in forwards}
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
            logit_scale = max(logit_scale, float(ref_logits.abs().max()))
            correct["reference"] += int((ref_logits.argmax(dim=1) == labels).sum())
            for name, forward in forwards.items():
                logits = forward(padded)[:n]
                correct[name] += int((logits.argmax(dim=1) == labels).sum())
                agreement[name].update(ref_logits, logits)
            take = min(n, keep - seen) if seen < keep else 0
            if take:
                kept["images"].append(images[:take].clone())
                kept["labels"].append(labels[:take].clone())
                kept["logits"].append(ref_logits[:take].clone())
            seen += n
    measures = {
        "seen": seen,
        "logit_scale": logit_scale,
        "top1": {k: v / seen if seen else 0.0 for k, v in correct.items()},
        "agreement": {k: m.result() for k, m in agreement.items()},
        "max_abs_logit_diff": {k: m.max_abs_logit_diff for k, m in agreement.items()},
    }
    return measures, {k: torch.cat(v) if v else torch.empty(0) for k, v in kept.items()}


def _agreement_fields(prefix: str, measures: dict, name: str) -> dict:
    agree, comparable = measures["agreement"][name]
    return {
        f"{prefix}_agreement": agree / comparable if comparable else None,
        f"{prefix}_comparable_samples": comparable,
        f"{prefix}_max_abs_logit_diff": measures["max_abs_logit_diff"][name],
    }


def coverage(
    prepared: torch.fx.GraphModule,
    int8_model: torch.fx.GraphModule,
    quantized_ops: dict[str, dict[str, int]],
) -> dict:
    """Report fields saying whether every conv/linear the quantizer annotated in `prepared`
    became int8: in the converted graph (`int8_model`) and, per lowered code, in the count of
    int8 kernel calls (`quantized_ops`). `unquantized_layers` names the annotated layers the
    converted graph keeps in float; a shortfall in generated code it cannot name is listed as
    "<n> <kind> layer(s) not lowered to int8 in <code>". `constant_layers` names the layers
    computed from parameters only, which freezing folds (never annotated, see
    `qatdist.quant.fixes.constant_layers`)."""
    annotated = quant_inspect.annotated_layers(prepared)
    wanted = set(annotated["conv"] + annotated["linear"])
    unquantized = [name for name in quant_inspect.float_layers(int8_model) if name in wanted]
    for where, counts in quantized_ops.items():
        for kind in ("conv", "linear"):
            named = sum(name in unquantized for name in annotated[kind])
            missing = len(annotated[kind]) - named - counts[kind]
            if missing > 0:
                unquantized.append(f"{missing} {kind} layer(s) not lowered to int8 in {where}")
    return {
        "annotated_conv_layers": len(annotated["conv"]),
        "annotated_linear_layers": len(annotated["linear"]),
        "quantization_complete": not unquantized,
        "unquantized_layers": unquantized,
        "constant_layers": [
            n for names in quant_inspect.constant_layers(prepared).values() for n in names
        ],
    }


def _compiled_forwards(
    int8_model: torch.nn.Module,
    fp32_model: torch.nn.Module,
    examples: dict[int, torch.Tensor],
    main_batch: int,
) -> tuple[dict[str, Callable], dict[str, int], float]:
    """Inductor-compiled int8 and fp32 forwards (compiled once per batch size here), the int8
    kernel calls counted in the generated code, and the compile seconds."""
    log.info("compiling int8 and fp32 models with Inductor (freezing)")
    start = time.perf_counter()
    int8_forward = compile_for_inference(int8_model)
    fp32_forward = compile_for_inference(fp32_model)
    with torch.no_grad():  # first calls compile, once per batch size (static shapes)
        # run_and_get_code resets Dynamo's caches first: it must be the first compile.
        _, codes = run_and_get_code(int8_forward, examples[main_batch])
        for example in examples.values():
            int8_forward(example)
            fp32_forward(example)
    counts = quant_inspect.count_quantized_ops("\n".join(codes))
    return {"fp32": fp32_forward, "int8": int8_forward}, counts, time.perf_counter() - start


def _latency_rows(
    forwards: dict[str, Callable], examples: dict[int, torch.Tensor], iters: int
) -> list[dict]:
    rows = []
    for b, example in examples.items():
        ms = side_by_side_latency_ms(forwards, example, iters)
        row = {"batch_size": b}
        for name, value in ms.items():
            row[f"{name}_ms"] = value
            row[f"{name}_images_per_s"] = b * 1000.0 / value
        row["int8_speedup"] = ms["fp32"] / ms["int8"]
        for name in ("int8_aoti", "int8_openvino"):
            if name in ms:
                row[f"{name}_speedup"] = ms["fp32"] / ms[name]
        row["fastest_int8"] = min((n for n in ms if n != "fp32"), key=ms.__getitem__)
        rows.append(row)
    return rows


def slower_int8_causes(report: dict) -> list[str]:
    """The likely causes of an int8 model slower than fp32 that the report lets us check:
    no int8 dot-product instructions, a small batch, one thread, layers left in float."""
    causes = []
    caps = reports.field(report, "cpu_int8_capabilities") or {}
    if not caps.get("int8_dot_product"):
        causes.append(
            "the CPU has no int8 dot-product instructions (avx512_vnni, avx_vnni, amx_int8)"
        )
    batch = reports.field(report, "latency_batch_size")
    if batch is not None and batch < 8:
        causes.append(f"batch size {batch}: per-call overheads (quantize, reorder) dominate")
    if reports.field(report, "threads") == 1:
        causes.append("one torch thread: int8 kernels gain most with several cores")
    if reports.field(report, "unquantized_layers"):
        left = ", ".join(reports.field(report, "unquantized_layers"))
        causes.append(f"layers left in float add quantize/dequantize round trips: {left}")
    if not reports.field(report, "compiled"):
        causes.append("not compiled: eager int8 runs the reference q/dq graph, not int8 kernels")
    return causes


def _measured_fields(
    measures: dict, rows: list[dict], quantized_ops: dict, fp32_linear_layers: int
) -> dict:
    """Report fields of the accuracy and latency measurements."""
    inductor_ops = quantized_ops.get("inductor", {})
    return {
        "int8_top1": measures["top1"]["int8"],
        "int8_reference_top1": measures["top1"]["reference"],
        "int8_reference_logit_scale": measures["logit_scale"],
        "int8_eval_samples": measures["seen"],
        **_agreement_fields("int8_compiled", measures, "int8"),
        "int8_latency_ms": rows[-1]["int8_ms"],
        "fp32_latency_ms": rows[-1]["fp32_ms"],
        "int8_speedup": rows[-1]["int8_speedup"],
        "latency_batch_size": rows[-1]["batch_size"],
        "latency": rows,
        "quantized_ops": quantized_ops,
        "quantized_conv_count": inductor_ops.get("conv"),
        "quantized_linear_count": inductor_ops.get("linear"),
        "linears_quantized": inductor_ops.get("linear"),
        "linears_present": fp32_linear_layers,
    }


def _flag_slower_int8(full: dict) -> dict:
    """`full` with `int8_slower_causes` when int8 lost to fp32, logged as a warning."""
    full.pop("int8_slower_causes", None)  # an earlier export's, kept in `report`
    if full["int8_slower_than_fp32"]:
        full["int8_slower_causes"] = slower_int8_causes(full)
        log.warning(
            "int8 is slower than fp32 (x%.2f at batch %d); likely causes: %s",
            full["int8_speedup"],
            full["latency_batch_size"],
            "; ".join(full["int8_slower_causes"])
            or "none of the checked ones (ISA, batch size, threads, layers left in float); small "
            "layers, or float ops between int8 ones (attention, normalisation), can cost more in "
            "quantize/dequantize than int8 saves",
        )
    return full


def _check_coverage(full: dict, require_full_quantization: bool) -> None:
    """Warn about (or, when required, refuse) annotated layers left in float."""
    if full["quantization_complete"]:
        return
    left = ", ".join(full["unquantized_layers"])
    if require_full_quantization:
        raise QuantizationIncomplete(
            f"runtime.require_full_quantization: layers left in float: {left}; "
            "no final artifacts were written"
        )
    log.warning("quantization incomplete: layers left in float: %s", left)


def _write_views(stage: Path, full: dict, rows: list[dict], batch_sizes: list[int]) -> None:
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
    openvino: bool = False,
    report: dict | None = None,
    reference_samples: int = 256,
    require_full_quantization: bool = False,
    eval_mismatch: Callable[[torch.Tensor], str | None] | None = None,
) -> dict:
    """Convert `prepared` (a QAT model in eval mode, observers off), evaluate and benchmark it,
    and write the artifacts listed in the module docstring into `out_dir`.

    `fp32_model` (same architecture) is the latency baseline, compiled alike. `val_batches(n)`
    yields (images, labels, ...) batches of at most n validation samples. Accuracy is measured
    at the largest of `batch_sizes`, latency (`latency_iters` timed runs, interleaved) at each.
    With `compile_model=False` the eager models are measured and no AOTI package is built;
    `aoti=False` skips only the AOTI package. `openvino=True` also writes the OpenVINO IR
    (`qatdist.finish.openvino_ir`; FinalCheckFailed when its runtime model has no int8
    kernel), measured beside the others. `report` holds the caller's fields (model, steps,
    fp32_fake_quant_top1, fp32_top1, ptq_int8_top1, ...), merged into report.json with the
    derived ones (`qatdist.run.report.with_derived`). Returns the full report.

    Annotated layers left in float set `quantization_complete: false` and a warning; with
    `require_full_quantization` they raise QuantizationIncomplete and nothing is written. An
    int8 model slower than fp32 logs the likely causes (`slower_int8_causes`).

    Before anything is written, the int8 model must answer a batch identically twice, and
    `eval_mismatch(images)` (`QatModel.eval_mismatch`: the float eval graph against the eager
    model in eval mode) must find nothing; otherwise FinalCheckFailed. After the measurements,
    the compiled (and AOTI) int8 logits must stay within `INT8_REL_LOGIT_DIFF_BOUND` of the
    converted reference's logit scale; otherwise Int8Disagreement, and nothing is written.
    """
    batch_sizes = sorted(set(batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch_sizes: expected positive integers, got {batch_sizes}")
    main_batch = batch_sizes[-1]
    aoti = aoti and compile_model
    fp32_model = fp32_model.eval()
    full = reports.report_fields(**((report or {}) | layer_counts(fp32_model)))

    with staged_output(out_dir) as stage:
        int8_model = convert_to_int8(prepared)
        full["int8_target"] = quant_target.target_of(int8_model.graph)
        generator = torch.Generator().manual_seed(0)
        examples = {
            b: torch.randn(b, 3, image_size, image_size, generator=generator) for b in batch_sizes
        }
        check_deterministic(int8_model, examples[main_batch], "the int8 model")
        if eval_mismatch is not None and (mismatch := eval_mismatch(examples[main_batch])):
            raise FinalCheckFailed(mismatch)
        exported = _save_program_and_reference(int8_model, examples[main_batch], stage)
        quantized_ops: dict[str, dict[str, int]] = {}
        forwards: dict[str, Callable] = {"fp32": fp32_model, "int8": int8_model}
        compile_s = aoti_s = 0.0
        if compile_model:
            forwards, quantized_ops["inductor"], compile_s = _compiled_forwards(
                int8_model, fp32_model, examples, main_batch
            )
        if aoti:
            log.info("building the AOTInductor package (freezing)")
            start = time.perf_counter()
            package = build_aoti_package(exported, stage / "model_int8_aoti.pt2")
            aoti_s = time.perf_counter() - start
            quantized_ops["aoti"] = quant_inspect.count_quantized_ops(aoti_package_source(package))
            forwards["int8_aoti"] = torch._inductor.aoti_load_package(str(package))
        if openvino:
            forwards["int8_openvino"], ov_fields = _openvino_artifact(
                prepared, examples[main_batch], stage
            )
            full |= ov_fields
        full |= coverage(prepared, int8_model, quantized_ops)
        _check_coverage(full, require_full_quantization)

        measured = {k: v for k, v in forwards.items() if k != "fp32"}
        measures, kept = _compare_on_val(
            int8_model, measured, val_batches(main_batch), pad_to=main_batch, keep=reference_samples
        )
        torch.save(kept, stage / "val_reference.pt")
        rows = _latency_rows(forwards, {b: examples[b] for b in batch_sizes}, latency_iters)
        full |= _measured_fields(measures, rows, quantized_ops, full["fp32_linear_layers"])
        full |= dict(latency_iters=latency_iters, compiled=compile_model, compile_seconds=compile_s)
        if aoti:
            full |= _agreement_fields("int8_aoti", measures, "int8_aoti")
            full |= {"int8_aoti_top1": measures["top1"]["int8_aoti"], "aoti_build_seconds": aoti_s}
        if openvino:
            full |= _agreement_fields("int8_openvino", measures, "int8_openvino")
            full |= {"int8_openvino_top1": measures["top1"]["int8_openvino"]}
        full = _flag_slower_int8(reports.with_derived(full | machine_facts()))
        check_int8_agreement(full, full["cpu_int8_capabilities"])
        _write_views(stage, full, rows, batch_sizes)
    return full
