"""The CPU an int8 model is built for (`quant.target`), and the weight range that keeps its int8
sums exact there.

oneDNN's int8 convolutions and matmuls multiply u8 activations by s8 weights. With int8
dot-product instructions (avx512_vnni, avx_vnni, amx_int8: target "vnni") the products are
summed in int32. Without them (AVX2, AVX-512 before VNNI: target "avx2") oneDNN first adds pairs
of products in saturating int16 (`vpmaddubsw`): 255 x -128 twice is -65280, far past -32768, and
the compiled model computes something other than the converted one.

For "avx2" the weights are quantized to -64..63: a pair of products then sums to at most
2 x 255 x 64 = 32640 <= 32767 in magnitude, whatever the activations, so no sum saturates
(OpenVINO NNCF's "overflow fix" makes the same choice). torchao's `reduce_range` (activations in
0..127, PyTorch fbgemm's answer) is not exact under Inductor: the int8 kernels' fused output
quantization ignores the graph's `quant_max` (`o_qmin`/`o_qmax` are matched and never read in
torchao/quantization/pt2e/inductor_passes/x86.py, torchao 0.18) and writes 0..255, so an
activation past its calibrated range reaches the next layer above 127 where the converted model
clamps it (measured in docs/cpu_targets.md).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import torch
from torchao.quantization.pt2e.quantizer import QuantizationConfig

from qatdist.topology import INT8_DOT_PRODUCT_FLAGS, cpu_int8_capabilities

# Concrete targets, weakest first; "auto" in the config resolves to one of them.
TARGETS = ("avx2", "vnni")
WEIGHT_RANGE = {"vnni": (-128, 127), "avx2": (-64, 63)}
# The artifact metadata file `torch.export.save` stores beside an int8 program.
METADATA_FILE = "qatdist.json"


def cpu_target(capabilities: dict | None = None) -> str:
    """The target of the CPU `capabilities` describes (default: this one,
    `qatdist.topology.cpu_int8_capabilities()`)."""
    caps = cpu_int8_capabilities() if capabilities is None else capabilities
    return "vnni" if caps["int8_dot_product"] else "avx2"


def resolve(target: str) -> str:
    """`target` ("auto", "vnni" or "avx2") as a concrete target: "auto" is this CPU's."""
    if target == "auto":
        return cpu_target()
    if target not in TARGETS:
        raise ValueError(f"quant.target: expected 'auto', 'vnni' or 'avx2', got {target!r}")
    return target


def weakest(targets: list[str]) -> str:
    """The target every CPU of `targets` computes exactly (the weakest of them)."""
    return min(targets, key=TARGETS.index)


def for_target(config: QuantizationConfig, target: str) -> QuantizationConfig:
    """`config` with its weights quantized to `target`'s range (activations unchanged; a
    config without weight quantization as it is)."""
    if config.weight is None:
        return config
    quant_min, quant_max = WEIGHT_RANGE[resolve(target)]
    weight = dataclasses.replace(config.weight, quant_min=quant_min, quant_max=quant_max)
    return dataclasses.replace(config, weight=weight)


def target_of_weight_range(quant_min: int, quant_max: int) -> str:
    """The target whose weight range is `quant_min..quant_max`; ValueError for another range."""
    for target, weight_range in WEIGHT_RANGE.items():
        if weight_range == (quant_min, quant_max):
            return target
    raise ValueError(f"weight range {quant_min}..{quant_max} is no qatdist target's")


def target_of(graph: torch.fx.Graph) -> str | None:
    """The target a converted int8 graph was quantized for, read from its weights' range
    (None: no quantized weight). ValueError when its weights mix ranges."""
    per_channel = (
        torch.ops.quantized_decomposed.quantize_per_channel.default,
        torch.ops.quantized_decomposed.dequantize_per_channel.default,
    )
    ranges = {(n.args[4], n.args[5]) for n in graph.nodes if n.target in per_channel}
    targets = {target_of_weight_range(*weight_range) for weight_range in ranges}
    if len(targets) > 1:
        raise ValueError(f"int8 graph with weights of several targets: {sorted(targets)}")
    return targets.pop() if targets else None


def metadata(target: str | None) -> dict[str, str]:
    """The `extra_files` of a saved int8 program: its target (null: no quantized weight)."""
    return {METADATA_FILE: json.dumps({"int8_target": target})}


def saved_target(extra_files: dict[str, str]) -> str | None:
    """The target `metadata` wrote, from the `extra_files` `torch.export.load` filled in
    (None: a program saved without it, or without quantized weights)."""
    text = extra_files.get(METADATA_FILE) or "{}"
    return json.loads(text).get("int8_target")


def weaker_cpu_message(target: str, capabilities: dict | None = None) -> str | None:
    """What goes wrong running a `target` int8 model on the CPU `capabilities` describes
    (default: this one), or None when that CPU computes it exactly."""
    caps = cpu_int8_capabilities() if capabilities is None else capabilities
    here = cpu_target(caps)
    if TARGETS.index(here) >= TARGETS.index(target):
        return None
    cap = caps.get("onednn_max_cpu_isa")
    lacking = f"ONEDNN_MAX_CPU_ISA={cap}" if cap else f"none of {', '.join(INT8_DOT_PRODUCT_FLAGS)}"
    return (
        f"int8 model built for target {target!r} runs on {caps['cpu_model'] or 'a CPU'} "
        f"(target {here!r}: {lacking}): its int16 partial "
        f"sums may saturate, so its outputs may differ from the converted model's by more than "
        f"rounding; rebuild it with quant.target = {here!r}"
    )


class Int8TargetWarning(UserWarning):
    """An int8 program runs on a CPU weaker than the target it was built for."""


_warned: set[tuple[str, str]] = set()


def warn_if_weaker_cpu(target: str, capabilities: dict | None = None) -> bool:
    """Warn (`Int8TargetWarning`, once per target and CPU in a process) when this CPU is
    weaker than `target`; returns whether it is."""
    caps = cpu_int8_capabilities() if capabilities is None else capabilities
    message = weaker_cpu_message(target, caps)
    if message is None:
        return False
    key = (target, caps["cpu_model"])
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, Int8TargetWarning, stacklevel=3)
    return True
