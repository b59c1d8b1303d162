"""What finalize measures: the task's metric and agreement of each int8 implementation against
the converted reference on the validation set, Inductor compilation, latency side by side, and
the machine."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterable

import torch
import torchao
import torchvision
from torch._inductor.utils import run_and_get_code

from qatdist.quant import inspect as quant_inspect
from qatdist.quant.convert import compile_for_inference
from qatdist.run import report as reports
from qatdist.tasks import Task
from qatdist.tasks.evaluate import first, outputs_over, side_by_side_latency_ms
from qatdist.topology import cpu_int8_capabilities

log = logging.getLogger(__name__)


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


def compare_on_val(
    task: Task,
    reference: Callable[[torch.Tensor], object],
    forwards: dict[str, Callable[[torch.Tensor], object]],
    batches: Iterable,
    *,
    pad_to: int,
    keep: int,
) -> tuple[dict, dict]:
    """`task`'s primary metric of `reference` and each of `forwards` over `batches`, and each
    forward's agreement with `reference` (`task.new_agreement()`). Batches are zero-padded to
    `pad_to` (static-shape compiled models see one batch size). Returns the measures and the
    first `keep` samples' images, target and reference predictions."""
    metrics = {name: task.new_metric() for name in ["reference", *forwards]}
    agreement = {name: task.new_agreement() for name in forwards}
    kept: dict[str, list] = {"images": [], "target": [], "logits": []}
    seen = 0
    for images, target, outputs in outputs_over(
        {"reference": reference, **forwards}, batches, pad_to
    ):
        n = images.shape[0]
        ref_outputs = outputs["reference"]
        metrics["reference"].update(ref_outputs, target)
        for name in forwards:
            metrics[name].update(outputs[name], target)
            agreement[name].update(ref_outputs, outputs[name])
        take = min(n, keep - seen) if seen < keep else 0
        if take:
            kept["images"].append(images[:take].clone())
            kept["target"].append(first(target, take))
            kept["logits"].append(task.predictions(ref_outputs)[:take].clone())
        seen += n
    measures = {
        "seen": seen,
        "metric": {k: m.compute()[task.metric] for k, m in metrics.items()},
        "values": {k: m.compute() for k, m in metrics.items()},
        "agreement": {k: m.result() for k, m in agreement.items()},
    }
    return measures, {k: _joined(v) for k, v in kept.items()}


def _joined(parts: list):
    """Batches of tensors concatenated (an empty tensor for none); other targets as a list."""
    if not parts:
        return torch.empty(0)
    if all(torch.is_tensor(p) for p in parts):
        return torch.cat(parts)
    return [item for part in parts for item in part]


def agreement_fields(prefix: str, measures: dict, name: str) -> dict:
    """The report fields of one implementation's agreement with the reference."""
    result = measures["agreement"][name]
    return {
        f"{prefix}_agreement": result["agreement"],
        f"{prefix}_comparable_samples": result["comparable"],
        f"{prefix}_max_abs_logit_diff": result["max_abs_diff"],
        f"{prefix}_output_scale": result["output_scale"],
    }


def compiled_forwards(
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


def latency_rows(
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


def measured_fields(metric: str, measures: dict, rows: list[dict], quantized_ops: dict) -> dict:
    """Report fields of the metric and latency measurements."""
    inductor_ops = quantized_ops.get("inductor", {})
    # The other values of a metric that has more than its primary one (per-class IoU, ...).
    values = {
        f"{name}_metric_values": measures["values"][key]
        for name, key in (("int8", "int8"), ("int8_reference", "reference"))
        if len(measures["values"][key]) > 1
    }
    return {
        **values,
        reports.metric_key("int8", metric): measures["metric"]["int8"],
        reports.metric_key("int8_reference", metric): measures["metric"]["reference"],
        "int8_eval_samples": measures["seen"],
        **agreement_fields("int8_compiled", measures, "int8"),
        "int8_latency_ms": rows[-1]["int8_ms"],
        "fp32_latency_ms": rows[-1]["fp32_ms"],
        "int8_speedup": rows[-1]["int8_speedup"],
        "latency_batch_size": rows[-1]["batch_size"],
        "latency": rows,
        "quantized_ops": quantized_ops,
        "quantized_conv_count": inductor_ops.get("conv"),
        "quantized_linear_count": inductor_ops.get("linear"),
    }
