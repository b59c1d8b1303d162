"""qatdist's C++ fake-quant ops against torchao's `FusedMovingAvgObsFakeQuantize` (the ATen
op): same outputs, gradients and buffers, bit for bit, in every schedule phase and at every
size."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
from torchao.quantization.pt2e.observer import (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

from qatdist.config import QuantConfig
from qatdist.quant import schedule
from qatdist.quant.capture import capture
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.kernels import native_ops
from qatdist.quant.kernels.fast_fake_quant import FastFusedFakeQuantize, use_fast_fake_quant
from qatdist.quant.prepare import prepare_qat


def _activation_fake_quant() -> FusedMovingAvgObsFakeQuantize:
    """What the x86 QAT config puts on activations: uint8, affine, per tensor."""
    return FusedMovingAvgObsFakeQuantize(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8
    )


def _weight_fake_quant() -> FusedMovingAvgObsFakeQuantize:
    """What it puts on weights: int8, symmetric, per output channel."""
    return FusedMovingAvgObsFakeQuantize(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def _pair(make):
    reference = make()
    fast = copy.deepcopy(reference)
    assert use_fast_fake_quant(fast) == 1
    assert type(fast) is FastFusedFakeQuantize
    return reference, fast


def _inputs(shape, step: int) -> torch.Tensor:
    """Ranges that move between steps, with values outside the running range (clamped) and
    exact ties (rounding)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(shape, generator=gen) * (1 + step) + 0.3 * step
    x.view(-1)[:4] = torch.tensor([0.0, 0.5, -0.5, 2.5])
    return x


def _assert_same_step(reference, fast, x, qparams_set: bool = True):
    """One forward + backward through each: outputs, input gradients and every buffer equal
    (scale and zero point only once fake quant has run: the ATen op leaves them uninitialised
    before)."""
    x_ref = x.clone().requires_grad_(True)
    x_fast = x.clone().requires_grad_(True)
    out_ref, out_fast = reference(x_ref), fast(x_fast)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fast.backward(grad)
    assert torch.equal(out_ref, out_fast)
    assert torch.equal(x_ref.grad, x_fast.grad)
    ref_buffers, fast_buffers = dict(reference.named_buffers()), dict(fast.named_buffers())
    assert ref_buffers.keys() == fast_buffers.keys()
    for name, value in ref_buffers.items():
        if name in ("scale", "zero_point") and not qparams_set:
            assert value.shape == fast_buffers[name].shape
            continue
        assert torch.equal(value, fast_buffers[name]), name


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of qatdist's C++ fake-quant op (the input's element count each)."""
    calls = []
    native_ops.load()
    op = torch.ops.qatdist.fake_quantize

    def counting(x, *args):
        calls.append(x.numel())
        return op(x, *args)

    monkeypatch.setattr(torch.ops.qatdist, "fake_quantize", counting)
    return calls


@pytest.mark.parametrize(
    "make, shape",
    [
        (_activation_fake_quant, (8, 16, 16, 16)),
        (_weight_fake_quant, (128, 32, 3, 3)),
        (_weight_fake_quant, (256, 1, 3, 3)),
        (_activation_fake_quant, (4, 3, 8, 8)),
        (_weight_fake_quant, (6, 3, 3, 3)),
        (_activation_fake_quant, (3, 5, 7)),
    ],
    ids=["activation", "weight", "depthwise", "activation_small", "weight_small", "odd_size"],
)
def test_bitwise_equal_to_torchao_in_every_phase(make, shape, kernel_calls):
    reference, fast = _pair(make)
    phases = [
        (True, False),  # observing before fake quant starts
        (True, True),  # observing and fake-quantizing
        (True, True),
        (False, True),  # observers frozen
        (False, False),  # fake quant off again
    ]
    for step, (observe, fake_quant) in enumerate(phases):
        for module in (reference, fast):
            module.observer_enabled.fill_(int(observe))
            module.fake_quant_enabled.fill_(int(fake_quant))
        _assert_same_step(reference, fast, _inputs(shape, step), qparams_set=step > 0)
    assert len(kernel_calls) == 3  # the fake-quant phases, whatever the size
    # Gradients are zero exactly where values were clamped, and some were.
    x = _inputs(shape, 7) * 20
    x.requires_grad_(True)
    fast.fake_quant_enabled.fill_(1)
    fast(x).sum().backward()
    assert (x.grad == 0).any() and (x.grad == 1).any()


def test_linear_weights_and_degenerate_ranges_match(kernel_calls):
    """2-D weights, an all-zero channel, a constant channel and a tiny-range channel go through
    ATen's special cases (scale 0.1, the small-scale cut-off)."""
    reference, fast = _pair(_weight_fake_quant)
    w = torch.randn(5, 8195)
    w[1] = 0.0
    w[2] = 0.7
    w[3] = torch.linspace(-1e-6, 1e-6, w.shape[1])
    _assert_same_step(reference, fast, w)
    _assert_same_step(reference, fast, w * 1.5)
    assert len(kernel_calls) == 2


@pytest.mark.parametrize("make", [_activation_fake_quant, _weight_fake_quant])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_never_raise(make, bad):
    """A diverging step feeds NaN or infinity to the fake quants; the training guard must then
    see a non-finite loss, not an exception. The C++ op matches the ATen op bit for bit (NaN
    included) wherever the ATen op returns; for a NaN weight, where the ATen op raises (its
    per-channel check rejects the NaN range's zero point), that channel's output is NaN and its
    gradient zero."""
    reference, fast = _pair(make)
    _assert_same_step(reference, fast, _inputs((6, 3, 4, 4), 0))  # a finite range first
    x = _inputs((6, 3, 4, 4), 1)
    x[2, 1, 0, 0] = bad
    x_fast = x.clone().requires_grad_(True)
    out_fast = fast(x_fast)
    out_fast.sum().backward()
    if make is _weight_fake_quant and math.isnan(bad):
        with pytest.raises(RuntimeError, match="zero_point"):
            reference(x)
        assert out_fast[2].isnan().all() and (x_fast.grad[2] == 0).all()
        assert out_fast[[0, 1, 3, 4, 5]].isfinite().all()
        return
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    out_ref.sum().backward()
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out_fast, out_ref, **same)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, **same)
    for name, value in reference.named_buffers():
        torch.testing.assert_close(dict(fast.named_buffers())[name], value, **same)
    assert not out_fast.isfinite().all()


@pytest.mark.parametrize("make", [_activation_fake_quant, _weight_fake_quant])
def test_fake_quant_before_any_observation_is_an_error(make):
    _, fast = _pair(make)
    fast.observer_enabled.fill_(0)
    with pytest.raises(RuntimeError, match="never seen data"):
        fast(torch.randn(4, 3))


class _ConvBnNet(nn.Module):
    """Two conv-BN-ReLU blocks and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_prepared_model_trains_and_converts_identically(kernel_calls):
    """A prepared conv-BN model: the fast modules replace every fake quant, training steps
    give bitwise the same weights and statistics as torchao's op, and convert_pt2e reads them."""
    torch.manual_seed(0)
    graph = capture(_ConvBnNet(), torch.randn(2, 3, 32, 32))
    reference = prepare_qat(copy.deepcopy(graph), QuantConfig(fast_fake_quant=False))
    # The weight scaling in the kernels sums BatchNorm's gradient in another order (its own
    # test: test_weight_scaling.py); here the fake quants alone, bit for bit.
    fast = prepare_qat(graph, QuantConfig(fused_weight_scaling=False))
    fake_quants = [m for m in fast.modules() if isinstance(m, FusedMovingAvgObsFakeQuantize)]
    assert fake_quants and all(type(m) is FastFusedFakeQuantize for m in fake_quants)
    assert not any(type(m) is FastFusedFakeQuantize for m in reference.modules())
    for model in (reference, fast):
        schedule.apply_phase(model, schedule.phase_at(0, QuantConfig()))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            images = torch.randn(16, 3, 32, 32, generator=gen)
            labels = torch.randint(0, 4, (16,), generator=gen)
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    assert kernel_calls  # the fast modules ran qatdist's op
    assert reference.state_dict().keys() == fast.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(value, fast.state_dict()[name]), name
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(convert_to_int8(reference)(images), convert_to_int8(fast)(images))


@pytest.mark.parametrize("make", [_activation_fake_quant, _weight_fake_quant])
def test_output_may_be_modified_in_place(make, kernel_calls):
    """googlenet's `relu_` and efficientnet_v2's residual `add_` act on a fake quant's output:
    the fast path's output must allow it, with the same gradient as torchao's op."""
    reference, fast = _pair(make)
    x = _inputs((128, 32, 4, 4), 0)
    x_ref, x_fast = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref, out_fast = reference(x_ref), fast(x_fast)
    assert kernel_calls  # the fast kernel ran
    out_ref.mul_(2.0).relu_().sum().backward()
    out_fast.mul_(2.0).relu_().sum().backward()
    assert torch.equal(out_ref, out_fast)
    assert torch.equal(x_ref.grad, x_fast.grad)


def test_a_failing_compiler_is_a_clear_error_and_leaves_no_library(tmp_path):
    """The C++ ops are built on first use; a compiler that fails stops the process with the
    command, the compiler's output and the way out, and caches nothing."""
    env = {**os.environ, "CXX": "false", "QATDIST_CACHE_DIR": str(tmp_path)}
    code = "from qatdist.quant.kernels import native_ops; native_ops.load()"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "NativeBuildError: compiling fake_quant.cpp failed" in done.stderr, done.stderr
    assert "quant.fast_fake_quant = false" in done.stderr
    assert "command: false " in done.stderr
    assert not list(tmp_path.rglob("*.so"))
