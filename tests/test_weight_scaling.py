"""The conv-BN weight scaling inside the weight fake-quant kernels (`quant.fused_weight_scaling`)
against the unfused graph: same outputs and buffers bit for bit, gradients within float32
rounding, the same int8 model, and a short training run that follows the unfused one."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qatdist.config import QuantConfig
from qatdist.quant import native_ops, schedule
from qatdist.quant.capture import capture
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.fast_fake_quant import scaled_weight
from qatdist.quant.prepare import prepare_qat
from qatdist.quant.weight_scaling import restore_weight_scaling


class _ConvBnNet(nn.Module):
    """Conv-BN layers: a small and a large weight, a depthwise one, and a conv with a bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.big = nn.Sequential(nn.Conv2d(16, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(256, 256, 3, padding=1, groups=256, bias=False), nn.BatchNorm2d(256)
        )
        self.fc = nn.Linear(256, 4)

    def forward(self, x):
        x = self.depthwise(self.big(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _deferred(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is scaled_weight)


@pytest.fixture
def models():
    """(fused, unfused) preparations of one captured model, in the default phase at step 0."""
    torch.manual_seed(0)
    graph = capture(_ConvBnNet(), torch.randn(2, 3, 16, 16))
    unfused = prepare_qat(copy.deepcopy(graph), QuantConfig(fused_weight_scaling=False))
    fused = prepare_qat(graph, QuantConfig())
    for model in (fused, unfused):
        schedule.apply_phase(model, schedule.phase_at(0, QuantConfig()))
    return fused, unfused


def _batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def _assert_grads_close(fused, unfused):
    unfused_params = dict(unfused.named_parameters())
    for name, param in fused.named_parameters():
        expected = unfused_params[name].grad
        if name.endswith(".weight") and param.ndim == 4:
            # The weight's gradient is the straight-through one times the scale: bitwise.
            assert torch.equal(param.grad, expected), name
        else:
            # BatchNorm gamma gets sum(grad * weight) summed in the kernel's order.
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_outputs_buffers_and_gradients_match_the_unfused_graph(models, monkeypatch):
    fused, unfused = models
    assert _deferred(fused) == 3 and _deferred(unfused) == 0
    assert fused.graph.python_code("self").src != unfused.graph.python_code("self").src
    calls = []
    native_ops.load()
    op = torch.ops.qatdist.scaled_fake_quantize

    def counting(weight, *args):
        calls.append(weight.shape)
        return op(weight, *args)

    monkeypatch.setattr(torch.ops.qatdist, "scaled_fake_quantize", counting)
    for step in range(3):
        images, labels = _batch(step)
        outs = []
        for model in (fused, unfused):
            model.zero_grad()
            out = model(images)
            F.cross_entropy(out, labels).backward()
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
        _assert_grads_close(fused, unfused)
        fused_state, unfused_state = fused.state_dict(), unfused.state_dict()
        assert fused_state.keys() == unfused_state.keys()
        for name, value in unfused_state.items():
            assert torch.equal(value, fused_state[name]), name
    assert len(calls) == 3 * 3  # every conv-BN weight, each step


def test_fake_quant_off_and_eval_follow_the_unfused_graph(models):
    fused, unfused = models
    images, _ = _batch(0)
    for phase in (
        schedule.QatPhase(fake_quant_on=False, observers_frozen=False, bn_frozen=False),
        schedule.QatPhase(fake_quant_on=True, observers_frozen=True, bn_frozen=True),
    ):
        for model in (fused, unfused):
            schedule.apply_phase(model, phase)
        with torch.no_grad():
            assert torch.equal(fused(images), unfused(images))
    for model in (fused, unfused):
        schedule.to_eval(model)
    with torch.no_grad():
        assert torch.equal(fused(images), unfused(images))


def test_short_training_run_and_conversion_match(models):
    fused, unfused = models
    for model in (fused, unfused):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(6):
            images, labels = _batch(step)
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    unfused_state = unfused.state_dict()
    for name, value in fused.state_dict().items():
        torch.testing.assert_close(value, unfused_state[name], rtol=1e-4, atol=1e-5, msg=name)
    # The same trained state gives the same int8 model whichever way it trained.
    unfused.load_state_dict(fused.state_dict())
    fused_int8, unfused_int8 = convert_to_int8(fused), convert_to_int8(unfused)
    assert _deferred(fused) == 3  # converting worked on a copy
    assert fused_int8.code == unfused_int8.code
    fused_state, unfused_state = fused_int8.state_dict(), unfused_int8.state_dict()
    assert fused_state.keys() == unfused_state.keys()
    for name, value in unfused_state.items():
        assert torch.equal(value, fused_state[name]), name
    images, _ = _batch(99)
    with torch.no_grad():
        assert torch.equal(fused_int8(images), unfused_int8(images))


def test_restore_gives_back_the_prepared_graph(models):
    fused, unfused = models
    assert restore_weight_scaling(fused) == 3
    assert fused.code == unfused.code
    assert restore_weight_scaling(fused) == 0
