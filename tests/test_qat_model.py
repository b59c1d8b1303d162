"""QatModel, the one owner of the QAT model's life: seeded build, no tensor shared with the fp32
model, phases, the eval context (observers, BatchNorm buffers and RNG untouched; phase and train
mode restored), float evaluation of the trained weights, int8 conversion and state loading."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qatdist.config import ModelConfig, QuantConfig
from qatdist.quant import QatModel, QatPhase, schedule

IMAGE_SIZE = 16


class ConvBnNet(nn.Module):
    """Conv-BN-ReLU twice, pool, dropout, Linear: BatchNorm buffers, observers and an RNG user."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _batch(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * scale
    return images, torch.randint(0, 4, (8,), generator=gen)


def _trained(steps: int = 3, quant_cfg: QuantConfig | None = None) -> QatModel:
    """A QatModel after a few SGD steps: weights, BatchNorm statistics and observer ranges
    all differ from their initial values."""
    torch.manual_seed(0)
    qat = QatModel.from_fp32(ConvBnNet(), quant_cfg or QuantConfig(), image_size=IMAGE_SIZE)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        images, labels = _batch(step)
        loss = F.cross_entropy(qat.prepared(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat


def _state(qat: QatModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in qat.state_dict().items()}


def _assert_same_state(before: dict, qat: QatModel) -> None:
    after = qat.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


def _bn_training_args(qat: QatModel) -> list[bool]:
    return [
        n.args[5]
        for n in qat.prepared.graph.nodes
        if n.op == "call_function" and n.target == torch.ops.aten.batch_norm.default
    ]


def test_build_is_seeded_and_starts_in_phase_zero():
    cfg = ModelConfig(name="tiny_model:tiny_cnn")  # tests/ is on sys.path under pytest
    quant = QuantConfig(fake_quant_start_step=5)
    a = QatModel.build(cfg, quant, num_classes=6, image_size=IMAGE_SIZE, seed=3)
    b = QatModel.build(cfg, quant, num_classes=6, image_size=IMAGE_SIZE, seed=3)
    c = QatModel.build(cfg, quant, num_classes=6, image_size=IMAGE_SIZE, seed=4)
    assert a.state_sha256() == b.state_sha256() != c.state_sha256()
    assert a.phase == schedule.phase_at(0, quant) == QatPhase(False, False, False)
    assert schedule.current_phase(a.prepared) == a.phase
    assert a.prepared(torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (3, 6)


def test_fp32_model_shares_nothing_and_training_leaves_it_unchanged():
    torch.manual_seed(0)
    fp32 = ConvBnNet()
    initial = copy.deepcopy(fp32.state_dict())
    qat = QatModel.from_fp32(fp32, QuantConfig(), image_size=IMAGE_SIZE)
    assert qat.fp32_model is fp32
    fp32_ptrs = {t.data_ptr() for t in fp32.state_dict().values()}
    assert not fp32_ptrs & {t.data_ptr() for t in qat.state_dict().values()}
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    images, labels = _batch(0)
    F.cross_entropy(qat.prepared(images), labels).backward()
    optimizer.step()
    assert not torch.equal(qat.state_dict()["conv1.weight"], initial["conv1.weight"])
    for key, value in fp32.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_a_prepared_model_sharing_tensors_is_refused():
    torch.manual_seed(0)
    fp32 = ConvBnNet()
    other = QatModel.from_fp32(ConvBnNet(), QuantConfig(), image_size=IMAGE_SIZE)
    other.prepared.load_state_dict(fp32.state_dict(), strict=False)  # copies: still distinct
    QatModel(fp32, other.prepared, QuantConfig())
    from qatdist.quant import capture, prepare_qat

    aliased = prepare_qat(capture(fp32, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)), QuantConfig())
    with pytest.raises(ValueError, match="shares tensors"):
        QatModel(fp32, aliased, QuantConfig())


@pytest.mark.parametrize("fake_quant", [True, False])
@pytest.mark.parametrize("bn_frozen", [False, True])
def test_evaluating_changes_no_buffer_nor_rng_and_restores_phase(fake_quant, bn_frozen):
    qat = _trained()
    phase = QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=bn_frozen)
    qat.set_phase(phase)
    before = _state(qat)
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()
    with qat.evaluating(fake_quant=fake_quant) as model:
        assert model is qat.prepared
        assert schedule.current_phase(model).observers_frozen
        assert schedule.current_phase(model).fake_quant_on is fake_quant
        assert not any(_bn_training_args(qat))
        outputs = [model(_batch(10 + i, scale=5.0)[0]) for i in range(3)]
        again = model(_batch(10, scale=5.0)[0])
        torch.rand(10), np.random.rand(10)  # RNG draws inside are undone on exit
    torch.testing.assert_close(again, outputs[0], rtol=0, atol=0)  # eval: dropout is off
    _assert_same_state(before, qat)
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], numpy_rng[1])
    assert qat.phase == phase
    assert schedule.current_phase(qat.prepared) == phase
    assert _bn_training_args(qat) == [not bn_frozen] * 2  # train mode, freeze kept
    qat.prepared(_batch(20, scale=5.0)[0])  # training again: observers move
    observer = "activation_post_process_0.activation_post_process.max_val"
    assert not torch.equal(qat.state_dict()[observer], before[observer])


def test_evaluating_without_fake_quant_is_the_float_model_of_the_trained_weights():
    qat = _trained()
    eager = ConvBnNet()
    eager.load_state_dict({k: v for k, v in qat.state_dict().items() if k in eager.state_dict()})
    eager.eval()
    images = _batch(30)[0]
    with torch.no_grad():
        reference = eager(images)
        with qat.evaluating(fake_quant=False) as model:
            float_logits = model(images)
        with qat.evaluating() as model:
            fake_quant_logits = model(images)
    # The QAT conv-BN rewrite scales and unscales the weights: fp32 rounding, nothing more.
    torch.testing.assert_close(float_logits, reference, rtol=1e-5, atol=1e-5)
    assert (fake_quant_logits - reference).abs().max() > 1e-3


def test_nested_evaluation_and_to_int8_keep_observers_paused():
    qat = _trained()
    before = _state(qat)
    with qat.evaluating() as model:
        with qat.evaluating(fake_quant=False):
            pass
        int8 = qat.to_int8()
        assert schedule.current_phase(model).observers_frozen  # still the outer context's
        model(_batch(40, scale=5.0)[0])
    _assert_same_state(before, qat)
    assert schedule.current_phase(qat.prepared) == qat.phase
    targets = {str(n.target) for n in int8.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    assert not any(
        isinstance(m, type(qat.prepared.activation_post_process_0)) for m in int8.modules()
    )
    assert int8(_batch(41)[0]).shape == (8, 4)


def test_load_state_dict_adopts_the_states_switches():
    trained = _trained()
    trained.set_phase(QatPhase(fake_quant_on=True, observers_frozen=True, bn_frozen=False))
    fresh = QatModel.from_fp32(ConvBnNet(), QuantConfig(), image_size=IMAGE_SIZE)
    assert not fresh.phase.observers_frozen
    fresh.load_state_dict(trained.state_dict())
    assert fresh.state_sha256() == trained.state_sha256()
    assert fresh.phase == trained.phase
    images = _batch(50)[0]
    with torch.no_grad(), fresh.evaluating() as a, trained.evaluating() as b:
        assert torch.equal(a(images), b(images))


def test_sync_in_one_process_measures_no_divergence():
    qat = _trained(steps=1)
    before = _state(qat)
    stats = qat.sync()
    assert stats.num_buffers > 0
    assert stats.max_divergence_before == stats.max_divergence_after == 0.0
    # One rank: the statistics are the global ones already (qparams are recomputed from them).
    for key in [k for k in before if k.endswith(("min_val", "max_val", "running_mean"))]:
        assert torch.equal(before[key], qat.state_dict()[key]), key
