"""Vectorized observer + fake-quant forward for torchao's `FusedMovingAvgObsFakeQuantize`.

The x86 QAT config inserts `FusedMovingAvgObsFakeQuantize` modules, whose forward is one call
to `aten.fused_moving_avg_obs_fake_quant`. Its CPU path is mostly scalar (torch 2.14): the
per-channel qparams are written one element at a time (a `select` + `fill_` per channel, about
10,000 per resnet18 step), and the fake-quant kernels it calls do not use the vector units
(about 5 ns per element against 0.3 ns for a vectorized multiply on this machine). Compiling
the whole training step does not help: Inductor falls back to the same ATen op.

`use_fast_fake_quant(model)` switches those modules to `FastFusedFakeQuantize`, which keeps
every buffer (so `convert_pt2e`, `quant.sync`, the schedule and checkpoints see the same
module) and computes what the ATen op computes, bit for bit, in one Inductor kernel per
forward and one per backward:

1. observe: per-channel or whole-tensor min/max, then the op's moving average (the first
   batch is taken as is);
2. qparams: ATen's `ChooseQuantizationParams`, elementwise, with its float/double steps;
3. fake quant: `(clamp(round(x * (1 / scale)) + zero_point, qmin, qmax) - zero_point) * scale`;
   the backward is the straight-through estimator, its mask recomputed from the input rather
   than stored (Inductor's CPU code writes bool tensors slowly).

Small tensors (see `MIN_KERNEL_ELEMENTS`) keep the ATen op, which is cheaper there. Kernels are
compiled once per process and kind (per channel or not, observing or not) with dynamic shapes:
a few seconds the first time, then from Inductor's on-disk cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
from torchao.quantization.pt2e.observer import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

# Where the ATen op is faster: a compiled kernel costs about 220 us per forward + backward
# whatever the size (Dynamo's guards, the autograd Function), the ATen op about 80 us + 5 ns
# per element + 1 us per channel for per-channel qparams (measured on this project's machine
# kind, 2 threads). Kernels run from MIN_KERNEL_ELEMENTS elements, or MIN_KERNEL_CHANNELS
# channels when per channel (mobilenet's depthwise weights: few elements, many channels).
MIN_KERNEL_ELEMENTS = 32768
MIN_KERNEL_CHANNELS = 192

# ATen's quant_utils::SMALL_SCALE_THRESHOLD (the smallest normal fp16), as a float32 value.
_SMALL_SCALE = torch.tensor(6.1e-5, dtype=torch.float32).item()


def _choose_qparams(lo, hi, quant_min: int, quant_max: int, symmetric: bool):
    """ATen's `quant_utils::ChooseQuantizationParams(min, max, qmin, qmax, preserve_sparsity=
    symmetric)`, elementwise, with its float/double steps: float32 scale, int32 zero point."""
    if symmetric:
        sym_min, sym_max = -((quant_max - quant_min) // 2 + 1), (quant_max - quant_min) // 2
        max_scale = torch.maximum((lo / sym_min).abs(), (hi / sym_max).abs()).double()
        both_signs = (lo < 0) & (hi > 0)
        lo = torch.where(both_signs, (max_scale * sym_min).float(), lo)
        hi = torch.where(both_signs, (max_scale * sym_max).float(), hi)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi.double() - lo.double()) / (quant_max - quant_min)
    degenerate = (scale.float() == 0) | torch.isinf(1.0 / scale.float())
    scale = torch.where(degenerate, 0.1, scale)
    small = scale < _SMALL_SCALE
    amplifier = _SMALL_SCALE / scale.float()
    span = _SMALL_SCALE * (quant_max - quant_min)
    small_lo = torch.where(lo == 0, lo, torch.where(hi == 0, -span, lo * amplifier))
    small_hi = torch.where(lo == 0, span, torch.where(hi == 0, hi, hi * amplifier))
    lo, hi = torch.where(small, small_lo, lo), torch.where(small, small_hi, hi)
    scale = torch.where(small, _SMALL_SCALE, scale)
    lo_q, hi_q = lo.double() / scale, hi.double() / scale
    zero_point = torch.where(
        abs(quant_min) - lo_q.abs() < abs(quant_max) - hi_q.abs(),
        quant_min - lo_q,
        quant_max - hi_q,
    )
    if symmetric:
        zero_point = torch.where((lo < 0) & (hi > 0), (quant_min + quant_max) / 2, zero_point)
    zero_point = torch.round(zero_point).clamp(quant_min, quant_max)
    return scale.float(), zero_point.int()


def _moving_average(running, current, constant: float):
    """aten.fused_moving_avg_obs_fake_quant's update: the first observation (running value
    still +-inf) is taken as is."""
    return torch.where(running.isinf(), current, running + constant * (current - running))


def _observe(flat, running_min, running_max, constant: float, per_channel: bool):
    """New (min, max): per row of a 2-D `flat` (per channel) or over a 1-D `flat`."""
    if per_channel:
        current_min, current_max = flat.amin(dim=1), flat.amax(dim=1)
    else:
        current_min, current_max = flat.amin(), flat.amax()
    return (
        _moving_average(running_min, current_min, constant),
        _moving_average(running_max, current_max, constant),
    )


def _fake_quant_values(flat, scale, zero_point, quant_min: int, quant_max: int, per_channel: bool):
    """(q, zero point, scale) broadcast against `flat`: q = round(x / scale) + zero_point
    before the clamp, with ATen's float steps (x * (1 / scale), round half to even)."""
    if per_channel:
        scale, zero_point = scale.unsqueeze(1), zero_point.unsqueeze(1)
    zero_point = zero_point.to(flat.dtype)
    return torch.round(flat * (1.0 / scale)) + zero_point, zero_point, scale


def _observe_and_fake_quant(
    flat,
    running_min,
    running_max,
    constant: float,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    per_channel: bool,
    observe: bool,
):
    """One forward of the fused module: returns (fake-quantized `flat`, min, max, scale,
    zero point)."""
    if observe:
        running_min, running_max = _observe(flat, running_min, running_max, constant, per_channel)
    scale, zero_point = _choose_qparams(running_min, running_max, quant_min, quant_max, symmetric)
    q, zp, s = _fake_quant_values(flat, scale, zero_point, quant_min, quant_max, per_channel)
    out = (q.clamp(quant_min, quant_max) - zp) * s
    return out, running_min, running_max, scale, zero_point


def _fake_quant_grad(
    flat, scale, zero_point, grad, quant_min: int, quant_max: int, per_channel: bool
):
    """Straight-through estimator: `grad` where the rounded value was inside the range."""
    q, _, _ = _fake_quant_values(flat, scale, zero_point, quant_min, quant_max, per_channel)
    return torch.where((q >= quant_min) & (q <= quant_max), grad, 0.0)


def _compiled(fn):
    # dynamic=True: one kernel for every size (inputs are always 1-D or 2-D, see `_flat`).
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _scaled_observe_and_fake_quant(
    rows,
    row_scale,
    running_min,
    running_max,
    constant: float,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    observe: bool,
):
    """`_observe_and_fake_quant` of `rows * row_scale[:, None]` (per channel): the conv-BN QAT
    weight scaling computed inside the kernel instead of as a pass of its own."""
    flat = rows * row_scale.unsqueeze(1)
    return _observe_and_fake_quant(
        flat, running_min, running_max, constant, quant_min, quant_max, symmetric, True, observe
    )


def _scaled_fake_quant_grad(
    rows, row_scale, scale, zero_point, grad, quant_min: int, quant_max: int
):
    """Gradients of `fake_quant(rows * row_scale[:, None])` for `rows` and `row_scale`: the
    straight-through estimator's, times the scale (bitwise what autograd's `mul` backward
    computes) and summed per row against `rows` (the same sum, in the kernel's own order)."""
    scaled = rows * row_scale.unsqueeze(1)
    masked = _fake_quant_grad(scaled, scale, zero_point, grad, quant_min, quant_max, True)
    return masked * row_scale.unsqueeze(1), (masked * rows).sum(dim=1)


_observe_kernel = _compiled(_observe)
_observe_and_fake_quant_kernel = _compiled(_observe_and_fake_quant)
_fake_quant_grad_kernel = _compiled(_fake_quant_grad)
_scaled_observe_and_fake_quant_kernel = _compiled(_scaled_observe_and_fake_quant)
_scaled_fake_quant_grad_kernel = _compiled(_scaled_fake_quant_grad)


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """`x` as rows of channels (channel axis 0) or as one vector, no copy when contiguous."""
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(-1)


def _flat(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """`_rows(x)` detached, and so neither a view nor requiring grad: the kernels see one kind
    of input whatever the caller passes, so Dynamo keeps one compiled graph per rank instead of
    recompiling on `requires_grad` and view-base guards."""
    return _rows(x, per_channel).detach()


class _ObserveAndFakeQuantize(torch.autograd.Function):
    """Observer update, qparams and fake quantization in one kernel; the backward is the
    straight-through estimator, its mask recomputed from the input. Takes and returns the
    flattened (`_flat`) tensor: the caller reshapes outside the Function, because a Function's
    output that is a view may not be modified in place (googlenet's `relu_`, efficientnet_v2's
    residual `add_` after a fake quant)."""

    @staticmethod
    def forward(ctx, rows, module, observe: bool):
        observer = module.activation_post_process
        per_channel = module.is_per_channel
        flat = rows.detach()  # see `_flat`
        out, new_min, new_max, scale, zero_point = _observe_and_fake_quant_kernel(
            flat,
            observer.min_val,
            observer.max_val,
            observer.averaging_constant,
            observer.quant_min,
            observer.quant_max,
            module.is_symmetric_quant,
            per_channel,
            observe,
        )
        if observe:
            observer.min_val.copy_(new_min)
            observer.max_val.copy_(new_max)
        write_resized(module.scale, scale)
        write_resized(module.zero_point, zero_point)
        ctx.save_for_backward(flat, scale, zero_point)
        ctx.args = (observer.quant_min, observer.quant_max, per_channel)
        return out

    @staticmethod
    def backward(ctx, grad):
        flat, scale, zero_point = ctx.saved_tensors
        return (
            _fake_quant_grad_kernel(flat, scale, zero_point, grad.detach(), *ctx.args),
            None,
            None,
        )


class _ScaledFakeQuantize(torch.autograd.Function):
    """`_ObserveAndFakeQuantize` of `rows * row_scale[:, None]` with the product computed in
    the kernels: one pass over the weight forward and one backward instead of three."""

    @staticmethod
    def forward(ctx, rows, row_scale, module, observe: bool):
        observer = module.activation_post_process
        rows, row_scale = rows.detach(), row_scale.detach()  # see `_flat`
        out, new_min, new_max, scale, zero_point = _scaled_observe_and_fake_quant_kernel(
            rows,
            row_scale,
            observer.min_val,
            observer.max_val,
            observer.averaging_constant,
            observer.quant_min,
            observer.quant_max,
            module.is_symmetric_quant,
            observe,
        )
        if observe:
            observer.min_val.copy_(new_min)
            observer.max_val.copy_(new_max)
        write_resized(module.scale, scale)
        write_resized(module.zero_point, zero_point)
        ctx.save_for_backward(rows, row_scale, scale, zero_point)
        ctx.args = (observer.quant_min, observer.quant_max)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, row_scale, scale, zero_point = ctx.saved_tensors
        grad_rows, grad_scale = _scaled_fake_quant_grad_kernel(
            rows, row_scale, scale, zero_point, grad.detach(), *ctx.args
        )
        return grad_rows, grad_scale, None, None


class ScaledWeight(NamedTuple):
    """A conv weight and its per-output-channel scale, not yet multiplied: what
    `scaled_weight` hands a `FastFusedFakeQuantize` so the product is taken in its kernel
    (`qatdist.quant.weight_scaling`)."""

    weight: torch.Tensor
    scale: torch.Tensor  # broadcastable against `weight`: (channels, 1, ..., 1)

    def product(self) -> torch.Tensor:
        """`weight * scale`, the node this stands for (same op, same autograd)."""
        return torch.mul(self.weight, self.scale)


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor) -> ScaledWeight:
    """Stands in the graph for `aten.mul.Tensor(weight, scale)` when the product's only user
    is a `FastFusedFakeQuantize`."""
    return ScaledWeight(weight, scale)


class FastFusedFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """`FusedMovingAvgObsFakeQuantize` with a vectorized forward (see the module docstring);
    same buffers, flags and `calculate_qparams`, same results as the ATen op."""

    def forward(self, X: torch.Tensor | ScaledWeight) -> torch.Tensor:
        observer = self.activation_post_process
        observe, fake_quant = bool(self.observer_enabled), bool(self.fake_quant_enabled)
        if not observe and fake_quant and observer.min_val.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__}: fake quantization is enabled but the observer has "
                "never seen data (enable the observer for at least one forward first)"
            )
        if isinstance(X, ScaledWeight):
            if not (fake_quant and self.is_per_channel and self._kernels_pay_off(X.weight)):
                return self.forward(X.product())  # what the unfused graph computes
            self._size_per_channel_buffers(X.weight, observe)
            rows = _rows(X.weight, per_channel=True)
            row_scale = X.scale.reshape(-1)
            return _ScaledFakeQuantize.apply(rows, row_scale, self, observe).view(X.weight.shape)
        if not self._kernels_pay_off(X):
            return super().forward(X)  # the ATen op: cheaper here, and the same result
        self._size_per_channel_buffers(X, observe)
        if not fake_quant:
            if observe:
                new_min, new_max = _observe_kernel(
                    _flat(X, self.is_per_channel),
                    observer.min_val,
                    observer.max_val,
                    observer.averaging_constant,
                    self.is_per_channel,
                )
                observer.min_val.copy_(new_min)
                observer.max_val.copy_(new_max)
            return X
        rows = _rows(X, self.is_per_channel)
        return _ObserveAndFakeQuantize.apply(rows, self, observe).view(X.shape)

    def _size_per_channel_buffers(self, X: torch.Tensor, observe: bool) -> None:
        observer = self.activation_post_process
        if observe and self.is_per_channel and observer.min_val.numel() != X.shape[0]:
            # First observation: the ATen op sizes the per-channel buffers the same way (it
            # leaves scale and zero point uninitialised until fake quant runs; here 1 and 0).
            channels = X.shape[0]
            observer.min_val.resize_(channels).fill_(float("inf"))
            observer.max_val.resize_(channels).fill_(float("-inf"))
            self.scale.resize_(channels).fill_(1.0)
            self.zero_point.resize_(channels).fill_(0)

    def _kernels_pay_off(self, X: torch.Tensor) -> bool:
        if X.numel() >= MIN_KERNEL_ELEMENTS:
            return True
        return self.is_per_channel and X.shape[0] >= MIN_KERNEL_CHANNELS


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
    `FastFusedFakeQuantize` in place (same object, same buffers); returns how many."""
    switched = 0
    for module in model.modules():
        if _supported(module):
            # A class switch rather than a new module: the graph, DDP's parameter list and
            # any optimizer keep referring to the same objects.
            module.__class__ = FastFusedFakeQuantize
            switched += 1
    return switched
