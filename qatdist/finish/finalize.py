"""The end of a run: convert, check, compile, measure, and write `final/`.

One implementation for the trainer's last step (rank 0, `Trainer.finish`) and for
`scripts/export_final.py` (`qatdist.finish.export`). The files (`qatdist.finish.artifacts`):

    model_int8.pt2        the converted model, `torch.export.save`, dynamic batch dimension;
                          load it with `qatdist.quant.load_int8` so a compile uses int8 kernels
    model_int8_aoti.pt2   AOTInductor package built with freezing (when `aoti=True`)
    model_int8_openvino.xml, .bin
                          OpenVINO IR of the same prepared model (when `openvino=True`;
                          `qatdist.finish.openvino_ir`), checked to run int8 kernels
    reference_io.pt       an input batch and the converted model's predictions for it
    val_reference.pt      the first validation samples: images, target, converted predictions
    report.json, report.md, latency.png

The checks before anything is written are in `qatdist.finish.checks`, the measurements in
`qatdist.finish.measurement`; the report assembly is here. Everything is built in a temporary
folder beside `out_dir` and moved into place at the end, so a failure part-way leaves
`out_dir` as it was. The report's keys are defined in `qatdist.run.report`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from qatdist.finish import artifacts, checks, measurement
from qatdist.finish.checks import FinalCheckFailed, QuantizationIncomplete
from qatdist.quant import inspect as quant_inspect
from qatdist.quant import target as quant_target
from qatdist.quant.convert import convert_to_int8
from qatdist.run import report as reports
from qatdist.tasks import Task

__all__ = ["FinalCheckFailed", "QuantizationIncomplete", "finalize"]

log = logging.getLogger(__name__)


def finalize(
    prepared: torch.nn.Module,
    fp32_model: torch.nn.Module,
    task: Task,
    val_batches: Callable[[int], Iterable],
    *,
    image_size: int,
    input_size: tuple[int, int] | None = None,
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

    `fp32_model` (same architecture) is the latency baseline, compiled alike. Latency and the
    saved program's example use (height, width) `input_size` inputs (default: the square
    `image_size`; `Task.input_size`). `val_batches(n)`
    yields (inputs, target, ...) batches of at most n validation samples, scored by `task`'s
    metric and compared by its agreement. The metric is measured at the largest of
    `batch_sizes`, latency (`latency_iters` timed runs, interleaved) at each.
    With `compile_model=False` the eager models are measured and no AOTI package is built;
    `aoti=False` skips only the AOTI package. `openvino=True` also writes the OpenVINO IR
    (`qatdist.finish.openvino_ir`; FinalCheckFailed when its runtime model has no int8
    kernel), measured beside the others. `report` holds the caller's fields (model, steps,
    the fp32 and PTQ baselines, ...), merged into report.json with `task`, `metric` and the
    derived ones (`qatdist.run.report.with_derived`). Returns the full report.

    Annotated layers left in float set `quantization_complete: false` and a warning; with
    `require_full_quantization` they raise QuantizationIncomplete and nothing is written. An
    int8 model slower than fp32 logs the likely causes (`checks.slower_int8_causes`).

    Before anything is written, the int8 model must answer a batch identically twice, and
    `eval_mismatch(images)` (`QatModel.eval_mismatch`: the float eval graph against the eager
    model in eval mode) must find nothing; otherwise FinalCheckFailed. After the measurements,
    the compiled (and AOTI) int8 outputs must stay within `checks.INT8_REL_OUTPUT_DIFF_BOUND` of
    the converted reference's scale; otherwise Int8Disagreement, and nothing is written.
    """
    batch_sizes = sorted(set(batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch_sizes: expected positive integers, got {batch_sizes}")
    main_batch = batch_sizes[-1]
    aoti = aoti and compile_model
    fp32_model = fp32_model.eval()
    task_fields = {"task": task.name, "metric": task.metric}
    task_fields["higher_is_better"] = task.higher_is_better
    full = reports.report_fields(**((report or {}) | task_fields | checks.layer_counts(fp32_model)))

    with artifacts.staged_output(out_dir) as stage:
        int8_model = convert_to_int8(prepared)
        full["int8_target"] = quant_target.target_of(int8_model.graph)
        generator = torch.Generator().manual_seed(0)
        height, width = input_size or (image_size, image_size)
        examples = {b: torch.randn(b, 3, height, width, generator=generator) for b in batch_sizes}
        predict = lambda images: task.predictions(int8_model(images))  # noqa: E731
        checks.check_deterministic(predict, examples[main_batch], "the int8 model")
        if eval_mismatch is not None and (mismatch := eval_mismatch(examples[main_batch])):
            raise FinalCheckFailed(mismatch)
        exported = artifacts.save_program_and_reference(
            int8_model, task, examples[main_batch], stage
        )
        quantized_ops: dict[str, dict[str, int]] = {}
        forwards: dict[str, Callable] = {"fp32": fp32_model, "int8": int8_model}
        compile_s = aoti_s = 0.0
        if compile_model:
            forwards, quantized_ops["inductor"], compile_s = measurement.compiled_forwards(
                int8_model, fp32_model, examples, main_batch
            )
        if aoti:
            log.info("building the AOTInductor package (freezing)")
            start = time.perf_counter()
            package = artifacts.build_aoti_package(exported, stage / "model_int8_aoti.pt2")
            aoti_s = time.perf_counter() - start
            source = artifacts.aoti_package_source(package)
            quantized_ops["aoti"] = quant_inspect.count_quantized_ops(source)
            forwards["int8_aoti"] = torch._inductor.aoti_load_package(str(package))
        if openvino:
            forwards["int8_openvino"], ov_fields = artifacts.openvino_artifact(
                prepared, examples[main_batch], stage
            )
            full |= ov_fields
        full |= checks.coverage(prepared, int8_model, quantized_ops)
        checks.check_coverage(full, require_full_quantization)

        measured = {k: v for k, v in forwards.items() if k != "fp32"}
        measures, kept = measurement.compare_on_val(
            task,
            int8_model,
            measured,
            val_batches(main_batch),
            pad_to=main_batch,
            keep=reference_samples,
        )
        torch.save(kept, stage / "val_reference.pt")
        rows = measurement.latency_rows(
            forwards, {b: examples[b] for b in batch_sizes}, latency_iters
        )
        full |= measurement.measured_fields(task.metric, measures, rows, quantized_ops)
        full |= dict(latency_iters=latency_iters, compiled=compile_model, compile_seconds=compile_s)
        if aoti:
            full |= measurement.agreement_fields("int8_aoti", measures, "int8_aoti")
            full |= {
                reports.metric_key("int8_aoti", task.metric): measures["metric"]["int8_aoti"],
                "aoti_build_seconds": aoti_s,
            }
        if openvino:
            full |= measurement.agreement_fields("int8_openvino", measures, "int8_openvino")
            key = reports.metric_key("int8_openvino", task.metric)
            full |= {key: measures["metric"]["int8_openvino"]}
        full = checks.flag_slower_int8(reports.with_derived(full | measurement.machine_facts()))
        checks.check_int8_agreement(full, full["cpu_int8_capabilities"])
        artifacts.write_views(stage, full, rows, batch_sizes)
    return full
