"""Fake (meta) implementations of qatdist's C++ ops: the shapes and dtypes each op returns,
computed without data, so that `torch.compile` and `torch.export` can trace a model that calls
them. Registered when `native_ops.load()` loads the library (the ops must exist first).

The real kernels size a per-channel observer's empty buffers at its first observation (as the
ATen op does); a traced graph cannot resize a buffer, so tracing needs buffers already sized:
compile or export a prepared model after at least one forward with observers on.
"""

from __future__ import annotations

import torch


def _check_sized(running_min: torch.Tensor, channels: int) -> None:
    if running_min.numel() != channels:
        raise RuntimeError(
            f"qatdist fake quant: {running_min.numel()} observer values for {channels} channels; "
            "a per-channel observer's buffers are sized by its first observation: run one "
            "forward with observers on before torch.compile / torch.export"
        )


def _forward(x, observer_enabled, fake_quant_enabled, running_min, running_max, scale,
             zero_point, averaging_constant, quant_min, quant_max, per_channel,
             symmetric):  # fmt: skip
    channels = x.shape[0] if per_channel else 1
    _check_sized(running_min, channels)
    # The output, and the qparams the backward reads (scales, zero points, whether it ran).
    return x.new_empty(x.shape), x.new_empty(2 * channels + 1)


def _scaled_forward(weight, factor, observer_enabled, fake_quant_enabled, running_min,
                    running_max, scale, zero_point, averaging_constant, quant_min, quant_max,
                    symmetric, divide_back):  # fmt: skip
    _check_sized(running_min, weight.shape[0])
    return weight.new_empty(weight.shape), weight.new_empty(2 * weight.shape[0] + 1)


torch.library.register_fake("qatdist::fake_quantize_forward")(_forward)
torch.library.register_fake("qatdist::scaled_fake_quantize_forward")(_scaled_forward)


@torch.library.register_fake("qatdist::fake_quantize")
def _fake_quantize(*args):
    return _forward(*args)[0]


@torch.library.register_fake("qatdist::scaled_fake_quantize")
def _scaled_fake_quantize(*args):
    return _scaled_forward(*args)[0]


@torch.library.register_fake("qatdist::fake_quantize_backward")
def _backward(x, grad, qparams, quant_min, quant_max):
    return grad.new_empty(grad.shape)


@torch.library.register_fake("qatdist::scaled_fake_quantize_backward")
def _scaled_backward(weight, factor, grad, qparams, quant_min, quant_max, divide_back):
    return weight.new_empty(weight.shape), factor.new_empty(factor.shape)
