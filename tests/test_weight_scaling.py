"""The conv-BN QAT arithmetic inside the weight fake-quant kernels (`quant.fused_weight_scaling`)
against the unfused graph: the weight scaling alone gives the same outputs and buffers bit for
bit; dividing the weight instead of the conv output rounds within the unfused graph's own
float32 rounding (both measured against the same math in float64); a short training run
follows the unfused one, and the int8 model is the same."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from qatdist.config import QuantConfig
from qatdist.quant import schedule
from qatdist.quant.capture import capture
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.kernels import native_ops, weight_scaling
from qatdist.quant.kernels.fast_fake_quant import (
    divided_in_weight,
    scaled_weight,
    scaled_weight_divided_back,
)
from qatdist.quant.kernels.weight_scaling import restore_weight_scaling
from qatdist.quant.prepare import prepare_qat


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


def _count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _prepare(graph: torch.fx.GraphModule, **quant) -> torch.fx.GraphModule:
    model = prepare_qat(copy.deepcopy(graph), QuantConfig(**quant))
    schedule.apply_phase(model, schedule.phase_at(0, QuantConfig()))
    return model


@pytest.fixture
def graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return capture(_ConvBnNet(), torch.randn(2, 3, 16, 16))


@pytest.fixture
def models(graph):
    """(fused, unfused) preparations of one captured model, in the default phase at step 0."""
    return _prepare(graph), _prepare(graph, fused_weight_scaling=False)


def _batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def test_every_conv_bn_division_moves_into_its_weight_fake_quant(models):
    fused, unfused = models
    assert _count(fused, scaled_weight_divided_back) == 3  # stem, big (zero bias), depthwise
    assert _count(fused, divided_in_weight) == 3
    assert _count(fused, scaled_weight) == 0
    for target in (scaled_weight, scaled_weight_divided_back, divided_in_weight):
        assert _count(unfused, target) == 0


def test_weight_scaling_alone_is_bitwise_the_unfused_graph(graph, monkeypatch):
    """Where the division cannot move (here: forced), the kernel takes only the product:
    outputs and buffers bit for bit, the weight's gradient bitwise, BatchNorm's gamma within
    float32 rounding (its sum runs in the kernel's order)."""
    monkeypatch.setattr(weight_scaling, "_output_division", lambda mul: None)
    fused, unfused = _prepare(graph), _prepare(graph, fused_weight_scaling=False)
    assert _count(fused, scaled_weight) == 3 and _count(fused, divided_in_weight) == 0
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
        unfused_params = dict(unfused.named_parameters())
        for name, param in fused.named_parameters():
            expected = unfused_params[name].grad
            if name.endswith(".weight") and param.ndim == 4:
                assert torch.equal(param.grad, expected), name  # straight-through x scale
            else:
                torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6, msg=name)
        fused_state, unfused_state = fused.state_dict(), unfused.state_dict()
        assert fused_state.keys() == unfused_state.keys()
        for name, value in unfused_state.items():
            assert torch.equal(value, fused_state[name]), name
    assert len(calls) == 3 * 3  # every conv-BN weight, each step


def _conv_bn_region(bias: bool) -> tuple[nn.Sequential, dict[str, torch.fx.GraphModule]]:
    """One conv-BN (BatchNorm in training mode, statistics away from their initial values) and
    its fused and unfused preparations with the activation fake quants off: the only fake
    quant left is the weight's, so every difference is rounding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1, bias=bias), nn.BatchNorm2d(64))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    graph = capture(net, torch.randn(2, 16, 8, 8))
    models = {"fused": _prepare(graph), "unfused": _prepare(graph, fused_weight_scaling=False)}
    for model in models.values():
        _activation_fake_quants_off(model)
    assert _count(models["fused"], divided_in_weight) == 1
    return net, models


def _float64_reference(net, running_var, x, upstream, weight_fake_quant):
    """The unfused graph's math in float64: the output and the parameters' gradients of
    sum(batch_norm(conv(x, fq(w * f)) / f [+ b]) * upstream), f = gamma / sqrt(var + eps), the
    weight fake quant a straight-through estimator with the qparams both graphs chose."""
    conv, bn = net
    eps = bn.eps
    leaves = {
        "0.weight": conv.weight.detach().double().requires_grad_(True),
        "1.weight": bn.weight.detach().double().requires_grad_(True),
        "1.bias": bn.bias.detach().double().requires_grad_(True),
    }
    if conv.bias is not None:
        leaves["0.bias"] = conv.bias.detach().double().requires_grad_(True)
    factor = leaves["1.weight"] / torch.sqrt(running_var.double() + eps)
    product = leaves["0.weight"] * factor.reshape(-1, 1, 1, 1)
    # The float32 product both graphs quantized, its fake quant and straight-through mask.
    product32 = conv.weight.detach() * (bn.weight.detach() / torch.sqrt(running_var + eps)).reshape(
        -1, 1, 1, 1
    )
    scale = weight_fake_quant.scale
    zero_point = weight_fake_quant.zero_point
    qmin = weight_fake_quant.activation_post_process.quant_min
    qmax = weight_fake_quant.activation_post_process.quant_max
    quantized = torch.fake_quantize_per_channel_affine(product32, scale, zero_point, 0, qmin, qmax)
    q = torch.round(product32 * (1.0 / scale.reshape(-1, 1, 1, 1))) + zero_point.reshape(
        -1, 1, 1, 1
    )
    passes = (q >= qmin) & (q <= qmax)
    weight = (
        torch.where(passes, product, product.detach()) + (quantized.double() - product).detach()
    )
    y = F.conv2d(x.double(), weight, None, padding=1) / factor.reshape(1, -1, 1, 1)
    if conv.bias is not None:
        y = y + leaves["0.bias"].reshape(1, -1, 1, 1)
    out = F.batch_norm(y, None, None, leaves["1.weight"], leaves["1.bias"], training=True, eps=eps)
    (out * upstream.double()).sum().backward()
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_divided_weight_rounds_within_the_unfused_graphs_float32_rounding(bias):
    net, models = _conv_bn_region(bias)
    running_var = net[1].running_var.clone()
    gen = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(8, 16, 8, 8, generator=gen), torch.randn(8, 64, 8, 8, generator=gen)
    results = {}
    for name, model in models.items():
        out = model(x)
        (out * upstream).sum().backward()
        results[name] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    weight_fake_quant = next(
        m for m in models["fused"].modules() if isinstance(m, FakeQuantizeBase) and m.is_per_channel
    )
    ref_out, ref_grads = _float64_reference(net, running_var, x, upstream, weight_fake_quant)

    def error(name: str, value: torch.Tensor, reference: torch.Tensor) -> float:
        return ((value.double() - reference).norm() / reference.norm()).item()

    pairs = [("output", lambda r: r[0], ref_out)] + [
        (f"grad {n}", lambda r, n=n: r[1][n], g) for n, g in ref_grads.items()
    ]
    for what, pick, reference in pairs:
        fused = error(what, pick(results["fused"]), reference)
        unfused = error(what, pick(results["unfused"]), reference)
        # A conv bias before training-mode BatchNorm has a zero gradient: there both graphs
        # hold rounding noise only, and the bound compares the two noises.
        assert fused <= 2 * unfused + 1e-6, (what, fused, unfused)


def _activation_fake_quants_off(model: torch.fx.GraphModule) -> None:
    """Activation fake quants off (observers too): a value a rounding apart would otherwise
    round to the next quantization step, and the comparison would measure that, not the
    conv-BN arithmetic."""
    for module in model.modules():
        if isinstance(module, FakeQuantizeBase) and not module.is_per_channel:
            module.disable_fake_quant()
            module.disable_observer()


def test_fake_quant_off_and_eval_follow_the_unfused_graph(models):
    """Without fake quant the fused graph divides the weight product back in float; in eval
    the kernels quantize and divide the weights: the unfused graph's values within float32
    rounding either way."""
    fused, unfused = models
    images, _ = _batch(0)
    off = schedule.QatPhase(fake_quant_on=False, observers_frozen=False, bn_frozen=False)
    for model in (fused, unfused):
        schedule.apply_phase(model, off)
    with torch.no_grad():
        torch.testing.assert_close(fused(images), unfused(images), rtol=1e-5, atol=1e-6)
    on = schedule.QatPhase(fake_quant_on=True, observers_frozen=True, bn_frozen=True)
    for model in (fused, unfused):
        schedule.apply_phase(model, on)
        schedule.to_eval(model)
        _activation_fake_quants_off(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(images), unfused(images), rtol=1e-5, atol=1e-6)


def test_short_training_run_and_conversion_match(models):
    fused, unfused = models
    losses = {}
    for name, model in (("fused", fused), ("unfused", unfused)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for step in range(6):
            images, labels = _batch(step)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fused"], losses["unfused"], rtol=1e-3, atol=1e-4)
    unfused_state = unfused.state_dict()
    for name, value in fused.state_dict().items():
        torch.testing.assert_close(value, unfused_state[name], rtol=1e-3, atol=1e-4, msg=name)
    # The same trained state gives the same int8 model whichever way it trained.
    unfused.load_state_dict(fused.state_dict())
    fused_int8, unfused_int8 = convert_to_int8(fused), convert_to_int8(unfused)
    assert _count(fused, divided_in_weight) == 3  # converting worked on a copy
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
