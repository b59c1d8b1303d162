"""Capture and QAT preparation of real torchvision models, and the int8 path end to end."""

import copy

import pytest
import torch
import torchvision
from torch._inductor.utils import run_and_get_code
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

from qatdist.config import ConfigError, QuantConfig
from qatdist.quant.capture import capture
from qatdist.quant.convert import compile_for_inference, convert_to_int8
from qatdist.quant.inspect import annotated_layers, count_quantized_ops
from qatdist.quant.model import QatModel
from qatdist.quant.prepare import build_quantizer, prepare_qat
from qatdist.quant.ptq import prepare_ptq, ptq_quantization_config
from qatdist.tasks.classification import agreement_where_decided


def _fake_quant_count(model):
    return sum(1 for name, _ in model.named_modules() if name.startswith("activation_post_process"))


def test_resnet18_shared_relu_needs_distinct_call_sites():
    model = torchvision.models.resnet18(num_classes=10)
    example = torch.randn(2, 3, 32, 32)
    raw = torch.export.export(model, (example,)).module()
    with pytest.raises(ValueError, match="more than one output node"):
        prepare_qat_pt2e(raw, build_quantizer(QuantConfig()))

    prepared = prepare_qat(capture(model, example), QuantConfig())
    assert _fake_quant_count(prepared) > 40
    prepared(torch.randn(5, 3, 32, 32))  # dynamic batch: any size trains


def test_fp32_module_names_are_left_unquantized():
    model = torchvision.models.resnet18(num_classes=10)
    example = torch.randn(2, 3, 32, 32)
    everything = prepare_qat(capture(model, example), QuantConfig())
    kept = prepare_qat(capture(model, example), QuantConfig(fp32_module_names=["conv1", "fc"]))
    assert _fake_quant_count(kept) < _fake_quant_count(everything)


def test_ptq_baseline_observes_with_min_max_and_keeps_the_same_layers_fp32():
    """The PTQ baseline is post-training quantization: min/max observers, no fake quantization
    (a QAT quantizer given the PTQ config would keep its moving-average fake quants), with the
    layers QAT keeps in fp32 kept in fp32 here too."""
    model = torchvision.models.resnet18(num_classes=10)
    cfg = QuantConfig(fp32_module_names=["conv1", "fc"])
    prepared = prepare_ptq(model, model.state_dict(), cfg, image_size=32)
    observers = {type(m) for name, m in prepared.named_modules() if name.startswith("activation_")}
    assert observers == {MinMaxObserver, PerChannelMinMaxObserver}
    qat = prepare_qat(capture(model, torch.randn(2, 3, 32, 32)), cfg)

    def quantization_points(graph):  # top-level observers / fake quants (not their parts)
        return [name for name, _ in graph.named_children() if name.startswith("activation_post")]

    assert len(quantization_points(prepared)) == len(quantization_points(qat)) > 30


def test_a_refused_quantization_config_fails_the_tests():
    """The old PTQ bug: a QAT quantizer given the PTQ config warns and stays QAT. pyproject's
    pytest filters make that warning an error, so it can never pass silently again."""
    with pytest.raises(UserWarning, match="Mixed QAT and Non-QAT"):
        build_quantizer(QuantConfig()).set_global(ptq_quantization_config())


def test_unknown_fp32_module_type_is_an_error():
    with pytest.raises(ConfigError, match="quant.fp32_module_types"):
        build_quantizer(QuantConfig(fp32_module_types=["torch.nn.NoSuchLayer"]))
    with pytest.raises(ConfigError, match="not supported"):
        build_quantizer(QuantConfig(fp32_module_types=["torch.nn.ReLU"]))


@pytest.mark.slow
def test_mobilenet_v3_prepares_trains_converts_and_compiles():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_large(num_classes=10)
    prepared = QatModel.from_fp32(model, QuantConfig(), image_size=32).prepared
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = copy.deepcopy(prepared.state_dict())
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(prepared(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in prepared.state_dict().items())

    int8 = convert_to_int8(prepared)
    targets = {str(n.target) for n in int8.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    with torch.no_grad():
        eager = int8(images)
        compiled, codes = run_and_get_code(compile_for_inference(int8), images)
    assert compiled.shape == (8, 10) and torch.isfinite(compiled).all()
    # Every convolution and linear the quantizer annotated runs an int8 kernel.
    annotated = annotated_layers(prepared)
    assert count_quantized_ops("\n".join(codes)) == {k: len(v) for k, v in annotated.items()}
    # Compiled int8 kernels and the reference q/dq graph round differently (by CPU vendor too),
    # and this 2-step model's logits are near ties: argmaxes are compared only where the
    # reference's top-2 margin exceeds the logit difference (possibly none here).
    agree, comparable = agreement_where_decided(eager, compiled)
    assert agree == comparable


def test_skipping_absent_conv_types_converts_identically():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from qatdist.quant.kernels.weight_scaling import restore_weight_scaling
    from qatdist.quant.schedule import to_eval

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    prepared = QatModel.from_fp32(model, QuantConfig(), image_size=12).prepared
    for _ in range(2):
        prepared(torch.randn(4, 3, 12, 12))
    fast = convert_to_int8(prepared)
    plain = copy.deepcopy(prepared)
    restore_weight_scaling(plain)  # torchao's conv-BN fold matches the original `mul`
    plain = convert_pt2e(plain)
    to_eval(plain)
    assert str(fast.graph) == str(plain.graph)
    images = torch.randn(3, 3, 12, 12)
    assert torch.equal(fast(images), plain(images))


@pytest.mark.parametrize("name, size", [("googlenet", 64), ("inception_v3", 80)])
def test_models_with_auxiliary_heads_train_on_one_output(name, size):
    """googlenet / inception_v3 are built without their auxiliary classifiers: in train mode
    they return the logits tensor the training step takes, not a namedtuple of three."""
    from qatdist.config import ModelConfig
    from qatdist.models import build_model

    model = build_model(ModelConfig(name=name), 10, image_size=size).train()
    out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
