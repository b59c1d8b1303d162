"""Fast observer + fake-quant forward and backward for torchao's `FusedMovingAvgObsFakeQuantize`.

The x86 QAT config inserts `FusedMovingAvgObsFakeQuantize` modules, whose forward is one call
to `aten.fused_moving_avg_obs_fake_quant`. Its CPU path is mostly scalar (torch 2.14): the
per-channel qparams are written one element at a time (a `select` + `fill_` per channel, about
10,000 per resnet18 step), and the fake-quant kernels it calls do not use the vector units
(about 5 ns per element against 0.3 ns for a vectorized multiply on this machine). Compiling
the whole training step does not help: Inductor falls back to the same ATen op.

`use_fast_fake_quant(model)` switches those modules to `FastFusedFakeQuantize`, which keeps
every buffer (so `convert_pt2e`, `quant.sync`, the schedule and checkpoints see the same
module) and computes what the ATen op computes, bit for bit, in qatdist's C++ ops
(`csrc/fake_quant.cpp`, built on first use by `native_ops`): one call per forward and one per
backward, whatever the tensor's size, with vectorized loops on torch's thread pool:

1. observe: per-channel or whole-tensor min/max, then the op's moving average (the first
   batch is taken as is);
2. qparams: ATen's own `ChooseQuantizationParams`;
3. fake quant: `(clamp(round(x * (1 / scale)) + zero_point, qmin, qmax) - zero_point) * scale`;
   the backward is the straight-through estimator, its mask recomputed from the input rather
   than stored.

C++ rather than `torch.compile`d kernels: those cost about 220 us a call in Dynamo guards and
the Python autograd Function, more than the arithmetic for small tensors (docs/performance.md
has both measurements).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
from torchao.quantization.pt2e.observer import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

from qatdist.quant.kernels import native_ops


class ScaledWeight(NamedTuple):
    """A conv weight and its per-output-channel scale, not yet multiplied: what
    `scaled_weight` hands a `FastFusedFakeQuantize` so the product is taken in its kernel
    (`qatdist.quant.kernels.weight_scaling`). With `divide_back`, the fake-quantized product is
    divided by the scale again, which the graph would otherwise do to the conv's output."""

    weight: torch.Tensor
    scale: torch.Tensor  # broadcastable against `weight`: (channels, 1, ..., 1)
    divide_back: bool = False

    def product(self) -> torch.Tensor:
        """`weight * scale`, the node this stands for (same op, same autograd)."""
        return torch.mul(self.weight, self.scale)


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor) -> ScaledWeight:
    """Stands in the graph for `aten.mul.Tensor(weight, scale)` when the product's only user
    is a `FastFusedFakeQuantize`."""
    return ScaledWeight(weight, scale)


def scaled_weight_divided_back(weight: torch.Tensor, scale: torch.Tensor) -> ScaledWeight:
    """`scaled_weight` whose fake quant also divides by `scale` again: stands for the `mul`
    when the conv's output division by the same scale moved into the kernel."""
    return ScaledWeight(weight, scale, divide_back=True)


def divided_in_weight(conv_output: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stands in the graph for `aten.div.Tensor(conv_output, scale)` whose division the
    weight's fake quant already did (`scaled_weight_divided_back`): the output as it is."""
    return conv_output


class FastFusedFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """`FusedMovingAvgObsFakeQuantize` computed by qatdist's C++ ops (see the module
    docstring); same buffers, flags and `calculate_qparams`, same results as the ATen op."""

    def forward(self, X: torch.Tensor | ScaledWeight) -> torch.Tensor:
        # The flags go into the ops as tensors (as into the ATen op), never read in Python: a
        # graph traced by torch.compile / torch.export then follows them at run time.
        observer = self.activation_post_process
        if isinstance(X, ScaledWeight):
            # Traced by torch.compile, the scaling inside the kernel gave BatchNorm's weight a
            # gradient 1e-3 (relative) away from eager's, while the unfused product compiled
            # matches it to rounding (torch 2.14, aot_eager and Inductor; tests/test_native_ops.py):
            # traced graphs keep the product as ATen ops.
            if not self.is_per_channel or torch.compiler.is_compiling():
                out = self.forward(X.product())  # what the unfused graph computes
                return torch.div(out, X.scale) if X.divide_back else out
            return torch.ops.qatdist.scaled_fake_quantize(
                X.weight,
                X.scale,
                self.observer_enabled,
                self.fake_quant_enabled,
                observer.min_val,
                observer.max_val,
                self.scale,
                self.zero_point,
                observer.averaging_constant,
                observer.quant_min,
                observer.quant_max,
                self.is_symmetric_quant,
                X.divide_back,
            )
        return torch.ops.qatdist.fake_quantize(
            X,
            self.observer_enabled,
            self.fake_quant_enabled,
            observer.min_val,
            observer.max_val,
            self.scale,
            self.zero_point,
            observer.averaging_constant,
            observer.quant_min,
            observer.quant_max,
            self.is_per_channel,
            self.is_symmetric_quant,
        )


def write_resized(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` into `buffer` in place, resizing it when the element count differs."""
    if buffer.numel() != value.numel():
        buffer.resize_(value.shape)
    buffer.copy_(value.reshape(buffer.shape).to(buffer.dtype))


def _supported(module: torch.nn.Module) -> bool:
    observer = getattr(module, "activation_post_process", None)
    if type(module) is not FusedMovingAvgObsFakeQuantize:
        return False
    if type(observer) is MovingAveragePerChannelMinMaxObserver:
        return module.ch_axis == 0  # the weights' output-channel axis, all the x86 config uses
    return type(observer) is MovingAverageMinMaxObserver


def use_fast_fake_quant(model: torch.nn.Module) -> int:
    """Switch every supported `FusedMovingAvgObsFakeQuantize` in `model` to
    `FastFusedFakeQuantize` in place (same object, same buffers); returns how many. Builds
    qatdist's C++ ops first if this machine has no cached build; on a machine without a C++
    compiler switches none (`native_ops.available` warns once) and torchao's op runs."""
    modules = [m for m in model.modules() if _supported(m)]
    if not modules or not native_ops.available():
        return 0
    for module in modules:
        # A class switch rather than a new module: the graph, DDP's parameter list and
        # any optimizer keep referring to the same objects.
        module.__class__ = FastFusedFakeQuantize
    return len(modules)


QATDIST_CPP, TORCHAO = "qatdist_cpp", "torchao"


def fake_quant_op(model: torch.nn.Module) -> str | None:
    """Which op computes `model`'s fake quants: "qatdist_cpp" (qatdist's C++ ops), "torchao"
    (torchao's `FusedMovingAvgObsFakeQuantize` op) or None (no fake quant)."""
    kinds = {type(m) for m in model.modules() if isinstance(m, FusedMovingAvgObsFakeQuantize)}
    if FastFusedFakeQuantize in kinds:
        return QATDIST_CPP
    return TORCHAO if kinds else None
