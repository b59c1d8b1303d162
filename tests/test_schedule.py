"""The QAT schedule on a real prepared model: phases, observer and BatchNorm freezes, train/eval
switches, fake quant off == fp32."""

import copy
import functools
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchvision.ops import StochasticDepth

from qatdist.config import QuantConfig
from qatdist.quant import QatModel, capture, schedule
from qatdist.quant.schedule import QatPhase
from qatdist.quant.sync import quant_buffers


class TinyNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear, plus a BatchNorm1d with its own momentum/eps and a
    dropout, whose literals a train/eval switch must keep."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn3 = nn.BatchNorm1d(8, momentum=0.3, eps=1e-3)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(self.bn3(torch.flatten(self.pool(x), 1))))


EXAMPLE = torch.randn(2, 3, 16, 16)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@functools.cache
def _template(dropout: float) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return QatModel.from_fp32(TinyNet(dropout), QuantConfig(), image_size=16).prepared


def _prepared(dropout: float = 0.2) -> torch.fx.GraphModule:
    """A fresh prepared model (a copy: capture and prepare once per module)."""
    return copy.deepcopy(_template(dropout))


def _batch(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(8, 3, 16, 16) * scale + shift


def _train_step(model, optimizer, x):
    loss = F.cross_entropy(model(x), torch.randint(0, 4, (x.shape[0],)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(model, suffixes):
    return {k: v.clone() for k, v in quant_buffers(model).items() if k.endswith(suffixes)}


def _bn_args(model):
    return [n.args[5:8] for n in model.graph.nodes if n.target == torch.ops.aten.batch_norm.default]


def _dropout_args(model):
    return [n.args[1:] for n in model.graph.nodes if n.target == torch.ops.aten.dropout.default]


@pytest.mark.parametrize(
    "cfg, step, expected",
    [
        (QuantConfig(), 0, (True, False, False)),
        (QuantConfig(), 10**6, (True, False, False)),
        (QuantConfig(fake_quant_start_step=5), 4, (False, False, False)),
        (QuantConfig(fake_quant_start_step=5), 5, (True, False, False)),
        (QuantConfig(observer_freeze_step=0), 0, (True, True, False)),
        (QuantConfig(fake_quant_start_step=2, observer_freeze_step=10, bn_freeze_step=8), 7,
         (True, False, False)),
        (QuantConfig(fake_quant_start_step=2, observer_freeze_step=10, bn_freeze_step=8), 8,
         (True, False, True)),
        (QuantConfig(fake_quant_start_step=2, observer_freeze_step=10, bn_freeze_step=8), 9,
         (True, False, True)),
        (QuantConfig(fake_quant_start_step=2, observer_freeze_step=10, bn_freeze_step=8), 10,
         (True, True, True)),
        (QuantConfig(fake_quant_start_step=20, bn_freeze_step=3), 3, (False, False, True)),
    ],
)  # fmt: skip
def test_phase_at(cfg, step, expected):
    assert schedule.phase_at(step, cfg) == QatPhase(*expected)


def test_observer_freeze_keeps_qparams_fixed_on_new_ranges():
    model = _prepared()
    for _ in range(2):
        model(_batch())
    schedule.apply_phase(
        model, QatPhase(fake_quant_on=True, observers_frozen=True, bn_frozen=False)
    )
    keys = ("scale", "zero_point", "min_val", "max_val")
    frozen = _snapshot(model, keys)
    assert len(frozen) == 4 * sum(isinstance(m, FakeQuantizeBase) for m in model.modules())
    for _ in range(3):
        model(_batch(scale=50.0, shift=20.0))
    after = _snapshot(model, keys)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)

    schedule.apply_phase(
        model, QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False)
    )
    model(_batch(scale=50.0, shift=20.0))
    thawed = _snapshot(model, ("activation_post_process_0.scale",))
    assert not torch.equal(thawed["activation_post_process_0.scale"],
                           frozen["activation_post_process_0.scale"])  # fmt: skip


def test_bn_freeze_survives_train_eval_switches_and_training():
    model = _prepared()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    _train_step(model, optimizer, _batch())
    keys = ("running_mean", "running_var", "num_batches_tracked")
    phase = QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=True)
    schedule.apply_phase(model, phase)
    frozen = _snapshot(model, keys)
    assert len(frozen) == 9
    for _ in range(2):
        _train_step(model, optimizer, _batch(scale=3.0, shift=1.0))
        schedule.to_eval(model)
        with torch.no_grad():
            model(_batch(scale=3.0, shift=1.0))
        schedule.to_train(model, phase)
        _train_step(model, optimizer, _batch(scale=3.0, shift=1.0))
    after = _snapshot(model, keys)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(args[0] is False for args in _bn_args(model))
    assert schedule.current_phase(model) == phase

    unfrozen = QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False)
    schedule.to_eval(model)
    schedule.to_train(model, unfrozen)
    _train_step(model, optimizer, _batch(scale=3.0, shift=1.0))
    moved = _snapshot(model, keys)
    assert all(not torch.equal(frozen[k], moved[k]) for k in frozen)
    assert moved["bn1.num_batches_tracked"] == frozen["bn1.num_batches_tracked"] + 1


def test_frozen_bn_in_train_mode_normalises_like_eval():
    model = _prepared(dropout=0.0)  # p=0 keeps train mode deterministic (after switches too)
    model(_batch(scale=2.0, shift=1.0))  # running stats away from their initial 0 / 1
    phase = QatPhase(fake_quant_on=True, observers_frozen=True, bn_frozen=True)
    schedule.apply_phase(model, phase)
    x = _batch()
    schedule.to_eval(model)
    expected = model(x)
    schedule.to_train(model, phase)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    schedule.unfreeze_bn(model)
    assert not torch.allclose(model(x), expected, atol=1e-3)  # batch statistics


def test_train_eval_switches_keep_bn_and_dropout_literals():
    model = _prepared()
    bn, dropout = _bn_args(model), _dropout_args(model)
    assert (0.3, 0.001) in [args[1:] for args in bn]  # bn3 kept its own momentum/eps
    assert dropout == [(0.2, True)]
    phase = QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False)
    schedule.to_eval(model)
    assert [args[1:] for args in _bn_args(model)] == [args[1:] for args in bn]
    assert all(args[0] is False for args in _bn_args(model))
    assert _dropout_args(model) == [(0.2, False)]
    schedule.to_train(model, phase)
    assert _bn_args(model) == bn
    assert _dropout_args(model) == dropout

    raw = _prepared()  # torchao's switch alone resets them: what to_train/to_eval guard against
    move_exported_model_to_eval(raw)
    move_exported_model_to_train(raw)
    assert _dropout_args(raw) == [(0.5, True)]
    assert (0.3, 0.001) not in [args[1:] for args in _bn_args(raw)]


def test_eval_forwards_leave_bn_state_alone():
    model = _prepared()
    model(_batch())
    schedule.to_eval(model)
    keys = ("running_mean", "running_var", "num_batches_tracked")
    before = _snapshot(model, keys)
    model(_batch(scale=4.0))
    after = _snapshot(model, keys)
    assert all(torch.equal(before[k], after[k]) for k in before)
    schedule.to_train(model, QatPhase(True, False, False))
    model(_batch(scale=4.0))
    assert _snapshot(model, ("bn1.num_batches_tracked",))["bn1.num_batches_tracked"] == (
        before["bn1.num_batches_tracked"] + 1
    )


def test_fake_quant_off_is_the_fp32_graph():
    torch.manual_seed(0)
    net = TinyNet()
    fp32 = capture(net, EXAMPLE)
    model = QatModel.from_fp32(net, QuantConfig(), image_size=16).prepared
    schedule.to_eval(model)
    schedule.to_eval(fp32)  # torchao's switch alone would give bn3 eps 1e-5 here
    net.eval()
    fp32_phase = QatPhase(fake_quant_on=False, observers_frozen=False, bn_frozen=False)
    schedule.apply_phase(model, fp32_phase)
    for _ in range(2):  # observers learn ranges (they run in eval mode too); BN stats stay
        model(_batch())
    x = _batch()
    with torch.no_grad():
        reference, eager = fp32(x), net(x)
        off = model(x)
        schedule.apply_phase(model, QatPhase(True, True, False))
        on = model(x)
    # The QAT graph convolves with BN-scaled weights and scales back: fp32 rounding of a
    # different arithmetic, whose size depends on the CPU's kernels; 1e-5 still tells it apart
    # from fake quantization by an order of magnitude.
    torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, reference, rtol=1e-5, atol=1e-5)
    assert (on - reference).abs().max() > 1e-4


def test_fake_quant_off_still_observes():
    model = _prepared()
    schedule.apply_phase(
        model, QatPhase(fake_quant_on=False, observers_frozen=False, bn_frozen=False)
    )
    model(_batch())
    observer = model.activation_post_process_0.activation_post_process
    assert torch.isfinite(observer.min_val).all()


def test_current_phase_round_trips_in_train_and_eval_mode():
    model = _prepared()
    phases = [QatPhase(*flags) for flags in itertools.product([False, True], repeat=3)]
    for phase in phases:
        schedule.apply_phase(model, phase)
        assert schedule.current_phase(model) == phase
        assert all(args[0] is (not phase.bn_frozen) for args in _bn_args(model))
    schedule.to_eval(model)
    for phase in phases:
        schedule.apply_phase(model, phase)
        assert schedule.current_phase(model) == phase
        assert all(args[0] is False for args in _bn_args(model))
    for phase in (QatPhase(True, False, True), QatPhase(False, True, False)):
        schedule.to_eval(model)
        schedule.apply_phase(model, phase)
        schedule.to_train(model, phase)
        assert schedule.current_phase(model) == phase
        assert all(args[0] is (not phase.bn_frozen) for args in _bn_args(model))


def test_current_phase_rejects_mixed_state():
    model = _prepared()
    schedule.apply_phase(model, QatPhase(True, False, False))
    model.activation_post_process_0.disable_fake_quant()
    with pytest.raises(ValueError, match="fake quant"):
        schedule.current_phase(model)


def test_schedule_reaches_a_model_wrapped_in_another_module():
    model = _prepared()
    wrapper = nn.Sequential(model)  # as DDP holds it: the graph module is a submodule
    phase = QatPhase(fake_quant_on=False, observers_frozen=True, bn_frozen=True)
    schedule.apply_phase(wrapper, phase)
    assert schedule.current_phase(model) == phase
    assert all(args[0] is False for args in _bn_args(model))


class StochasticDepthNet(nn.Module):
    """Two residual blocks whose branch goes through torchvision's StochasticDepth: p=0.5 (export
    leaves `bernoulli_`'s p out, the default) and p=0.2 in batch mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop1 = StochasticDepth(p=0.5, mode="row")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop2 = StochasticDepth(p=0.2, mode="batch")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.drop1(F.relu(self.conv1(x)))
        x = x + self.drop2(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _mask_args(model):
    ops = (torch.ops.aten.bernoulli_.float, torch.ops.aten.div_.Tensor)
    return [(n.args[1:], n.kwargs) for n in model.graph.nodes if n.target in ops]


def test_stochastic_depth_is_identity_in_eval_and_int8_and_random_in_train():
    torch.manual_seed(0)
    net = StochasticDepthNet()
    qat = QatModel.from_fp32(net, QuantConfig(), image_size=16)
    train_args = _mask_args(qat.prepared)
    assert train_args == [((), {}), ((0.5,), {}), ((0.8,), {}), ((0.8,), {})]
    qat.prepared(_batch())  # observers learn ranges
    x = _batch()
    with torch.no_grad():
        with qat.evaluating(fake_quant=False) as model:
            assert _mask_args(model) == [((1.0,), {})] * 4
            off = [model(x) for _ in range(2)]
        with qat.evaluating() as model:
            on = [model(x) for _ in range(2)]
        reference = net.eval()(x)  # torchvision's eval: the branch unchanged
    torch.testing.assert_close(off[0], reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(off[0], off[1]) and torch.equal(on[0], on[1])

    assert _mask_args(qat.prepared) == train_args
    schedule.to_eval(qat.prepared)  # twice: the train-mode literals are kept once
    schedule.to_eval(qat.prepared)
    schedule.to_train(qat.prepared, qat.phase)
    assert _mask_args(qat.prepared) == train_args
    torch.manual_seed(1)
    with torch.no_grad():
        first, second = qat.prepared(x), qat.prepared(x)
    assert (first - second).abs().max() > 1e-3

    int8 = qat.to_int8()
    assert _mask_args(int8) == [((1.0,), {})] * 4
    with torch.no_grad():
        outputs = []
        for seed in (2, 3):
            torch.manual_seed(seed)
            outputs.append(int8(x))
        exported = torch.export.export(int8, (x,)).module()
        outputs.append(exported(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert _mask_args(qat.prepared) == train_args  # the conversion copied; training goes on
