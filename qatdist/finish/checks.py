"""The checks of the model about to be written: it computes deterministically, every layer the
quantizer annotated became int8, and when int8 is slower than fp32, the likely causes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from qatdist.quant import inspect as quant_inspect
from qatdist.quant import target as quant_target
from qatdist.run import report as reports

log = logging.getLogger(__name__)


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


# Largest |compiled - converted| output difference accepted, as a fraction of the converted
# model's largest |output| over the validation set (classification: logits). The two compute the
# same int8 model and differ only where a float rounding flips an activation's int8 rounding:
# one quantization step, 1/255 of that tensor's range (0.4%). Such flips, spread over the layers,
# measured 0.5-1.8% (resnet18, the CIFAR-10 ResNet-20: docs/cpu_targets.md); 5% is about 13
# steps of an 8-bit output range. A saturated int16 sum (a CPU without int8 dot products,
# quant.target 'vnni') loses up to half of its value and measured about 40% on the ResNet-20.
INT8_REL_OUTPUT_DIFF_BOUND = 0.05


class Int8Disagreement(FinalCheckFailed):
    """The compiled int8 model's outputs differ from the converted reference's by more than int8
    rounding explains (`INT8_REL_OUTPUT_DIFF_BOUND`). Nothing is written."""


def check_int8_agreement(full: dict, capabilities: dict) -> None:
    """Raise Int8Disagreement when the compiled (or AOTI) int8 model's largest output difference
    from the converted reference exceeds `INT8_REL_OUTPUT_DIFF_BOUND` of the reference outputs'
    scale; the message names the target and the CPU when the CPU is weaker than the target."""
    for prefix in ("int8_compiled", "int8_aoti"):
        diff, scale = full.get(f"{prefix}_max_abs_logit_diff"), full.get(f"{prefix}_output_scale")
        if diff is None or scale is None or diff <= INT8_REL_OUTPUT_DIFF_BOUND * scale:
            continue
        target = full.get("int8_target")
        cause = target is not None and quant_target.weaker_cpu_message(target, capabilities)
        raise Int8Disagreement(
            f"{prefix.removeprefix('int8_')} int8 outputs differ from the converted reference by "
            f"{diff:.4g} ({diff / scale:.1%} of the outputs' scale {scale:.4g}; rounding stays "
            f"within {INT8_REL_OUTPUT_DIFF_BOUND:.0%})"
            + (f": the {cause}" if cause else "")
            + "; nothing was written"
        )


class QuantizationIncomplete(RuntimeError):
    """Annotated layers were left in float and the caller required full quantization."""


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


def flag_slower_int8(full: dict) -> dict:
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


def check_coverage(full: dict, require_full_quantization: bool) -> None:
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
