"""Training-only branches qatdist does not know by pattern (efficientnet_pytorch's drop connect)
stay out of evaluation and the int8 model: the eval graph computes what the eager model computes
in eval(), on every call; a model random in eval mode is refused before training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ROOT, tiny_run_args, torchrun
from tiny_model import MBConvBlock
from torch import nn

from qatdist.config import QuantConfig
from qatdist.finish.checks import FinalCheckFailed, check_deterministic
from qatdist.quant import QatModel, QatPhase, schedule
from qatdist.quant.capture import capture
from qatdist.quant.fixes.training_only import (
    TrainingOnlyBranchError,
    describe,
    eager_mismatch,
    random_nodes,
)
from qatdist.quant.prepare import prepare_qat

IMAGE_SIZE = 16


class DropConnectNet(nn.Module):
    """Conv-BN-ReLU stem and MBConv blocks with BatchNorm'd projections: the conv-BN QAT rewrite
    runs in both captures."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(MBConvBlock(8), MBConvBlock(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def trained() -> dict:
    """A DropConnectNet QAT-trained for a few steps (fake quant on from the start)."""
    torch.manual_seed(0)
    model = DropConnectNet()
    qat = QatModel.from_fp32(model, QuantConfig(), image_size=IMAGE_SIZE)
    qat.set_phase(QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, 10, (16,))
    for _ in range(6):
        loss = nn.functional.cross_entropy(qat.prepared(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"qat": qat, "images": torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE)}


def test_a_train_mode_capture_would_keep_drop_connect_in_eval():
    """What goes wrong without `capture_for_qat`: the train-mode graph in eval mode is random."""
    torch.manual_seed(0)
    model = DropConnectNet()
    graph = capture(copy.deepcopy(model).train(), torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    schedule.to_eval(graph)
    assert sorted(describe(n) for n in random_nodes(graph)) == [
        "aten.rand in module 'blocks.0' (MBConvBlock)",
        "aten.rand in module 'blocks.1' (MBConvBlock)",
    ]
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert not torch.equal(graph(images), graph(images))


def test_the_qat_graph_leaves_drop_connect_out_and_says_so(trained):
    qat = trained["qat"]
    assert qat.training_only_ops == [
        "aten.rand in module 'blocks.0' (MBConvBlock)",
        "aten.rand in module 'blocks.1' (MBConvBlock)",
    ]
    assert not random_nodes(qat.prepared)
    assert "aten.rand.default" not in _ops(qat.prepared)
    # BatchNorm trains on batch statistics: the running mean moved during the steps
    assert qat.state_dict()["stem.1.running_mean"].abs().sum() > 0


def test_evaluation_is_the_eager_eval_model_and_deterministic(trained):
    qat, images = trained["qat"], trained["images"]
    assert qat.eval_mismatch(images) is None  # float eval graph == eager eval, trained weights
    with torch.no_grad(), qat.evaluating() as model:  # fake-quantized, trained state
        first, second = model(images), model(images)
    assert torch.equal(first, second)


def test_int8_model_has_no_random_op_and_answers_alike(trained):
    qat, images = trained["qat"], trained["images"]
    int8 = qat.to_int8()
    assert not random_nodes(int8)
    assert not {"aten.rand.default", "aten.floor.default"} & set(_ops(int8))
    check_deterministic(int8, images, "the int8 model")  # raises when random
    with torch.no_grad(), qat.evaluating() as fake_quant:
        reference = fake_quant(images)
        out = int8(images)
    # int8 computes what fake quant simulates, up to a few quantization steps of the logits
    assert (out - reference).abs().max() < 0.1 * reference.abs().max() + 1e-3


def test_the_eval_check_catches_a_train_mode_capture():
    """`eval_mismatch` (run before training and by finalize) on a QatModel built the old way,
    from the train-mode capture: its evaluation is random and it says so with the numbers."""
    torch.manual_seed(0)
    model = DropConnectNet()
    graph = capture(copy.deepcopy(model).train(), torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    old_way = QatModel(model, prepare_qat(graph, QuantConfig()), QuantConfig())
    mismatch = old_way.eval_mismatch(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert mismatch.startswith("two evaluations of the same batch differ (max |difference| ")


def test_eager_match_allows_float_rounding_only():
    out = torch.randn(8, 10) * 5
    assert eager_mismatch(out * (1 + 1e-6), out) is None
    assert "max |difference| 0.5" in eager_mismatch(out + 0.5, out)


class NoisyInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.noise = Noise()

    def forward(self, x):
        return self.noise(self.conv(x)).mean((2, 3))


class Noise(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)  # in eval mode too


def test_a_model_random_in_eval_mode_is_refused_naming_op_and_module():
    with pytest.raises(TrainingOnlyBranchError, match=r"aten\.randn_like in module 'noise'"):
        QatModel.from_fp32(NoisyInEval(), QuantConfig(), image_size=IMAGE_SIZE)


def test_final_check_refuses_a_random_model():
    with pytest.raises(FinalCheckFailed, match="differently on two calls"):
        check_deterministic(lambda x: x + torch.rand_like(x), torch.zeros(2, 3), "the model")


def test_a_run_with_drop_connect_writes_a_deterministic_int8_model(tiny_shards, tmp_path):
    """The whole run, one rank: final/model_int8.pt2 holds no random op and answers alike."""
    out_dir = tmp_path / "run"
    args = tiny_run_args(
        tiny_shards,
        out_dir,
        "--model.name=tests.tiny_model:drop_connect_cnn",
        "--runtime.compile_final=false",
        "--train.eval_every_epochs=0",
    )
    result = torchrun(args, nproc=1, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training-only random ops the eval graph must not run: aten.rand in module" in (
        result.stderr
    )
    program = torch.export.load(out_dir / "final" / "model_int8.pt2")
    assert not {"aten.rand.default", "aten.floor.default"} & set(_ops(program.graph_module))
    images = torch.randn(4, 3, 32, 32)
    module = program.module()
    assert torch.equal(module(images), module(images))
    report = json.loads((out_dir / "final" / "report.json").read_text())
    assert report["training_only_ops"] == [
        "aten.rand in module '2' (MBConvBlock)",
        "aten.rand in module '3' (MBConvBlock)",
    ]
