"""Segmentation models: torchvision's builders by model.name (dict outputs, aux heads), a UNet
from a `.py` factory, an ImageNet classifier's weights loaded into the backbone with the unused
entries listed, and the PT2E QAT flow on what these models are made of (bilinear upsampling,
adaptive pooling, hardswish / hardsigmoid attention, concatenated skip connections) with
dynamic height and width: train on crops, convert, compile and run on a larger frame."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torchvision

from qatdist.config import ConfigError, ModelConfig, QuantConfig
from qatdist.models import SEGMENTATION_MODELS, build_fp32
from qatdist.models.weights import BackboneWeightsSource
from qatdist.quant.convert import compile_for_inference
from qatdist.quant.model import QatModel

UNET = f"{Path(__file__).resolve().parent / 'seg_unet.py'}:unet"


@pytest.mark.parametrize(
    ("name", "aux"),
    [
        ("lraspp_mobilenet_v3_large", False),
        ("deeplabv3_mobilenet_v3_large", True),
        ("fcn_resnet50", True),
        ("deeplabv3_resnet50", False),
    ],
)
def test_torchvision_segmenters_by_name(name: str, aux: bool) -> None:
    assert name in SEGMENTATION_MODELS
    model, source = build_fp32(ModelConfig(name=name), 5, image_size=64, dense=True, aux_loss=aux)
    assert source is None
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 40, 56))
    assert isinstance(out, dict) and out["out"].shape == (1, 5, 40, 56)
    assert ("aux" in out) == aux
    if aux:
        assert out["aux"].shape == (1, 5, 40, 56)


def test_model_kind_must_match_the_task() -> None:
    with pytest.raises(ConfigError, match="is a segmentation model; it needs task.name"):
        build_fp32(ModelConfig(name="lraspp_mobilenet_v3_large"), 5, image_size=64)
    with pytest.raises(ConfigError, match="is a torchvision classifier; segmentation needs"):
        build_fp32(ModelConfig(name="resnet18"), 5, image_size=64, dense=True)
    with pytest.raises(ConfigError, match="unknown torchvision segmentation model"):
        build_fp32(ModelConfig(name="unet_xl"), 5, image_size=64, dense=True)
    # A factory's per-pixel output width is checked against data.num_classes.
    model, _ = build_fp32(ModelConfig(name=UNET), 7, image_size=32, dense=True)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7, 32, 32)
    with pytest.raises(ConfigError, match="expected per-pixel logits"):
        build_fp32(ModelConfig(name="qatdist.models:tiny_vit"), 7, image_size=32, dense=True)


def test_imagenet_backbone_loaded_into_the_segmenter(tmp_path: Path) -> None:
    torch.manual_seed(1)
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large_imagenet.pt"
    torch.save({"model": classifier.state_dict()}, path)
    cfg = ModelConfig(name="lraspp_mobilenet_v3_large", weights=str(path))
    model, source = build_fp32(cfg, 11, image_size=64, dense=True)
    assert isinstance(source, BackboneWeightsSource)
    assert source.nesting_key == "model" and source.loaded_into == "backbone"
    assert source.name_mapping == "features.<name> -> backbone.<name>"
    # The backbone is the classifier's `features`, entry for entry; its head is listed unused.
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[f"features.{key}"]), key
    assert sorted(source.unused_keys) == sorted(
        k for k in classifier.state_dict() if not k.startswith("features.")
    )
    assert source.unused_keys and all(k.startswith("classifier.") for k in source.unused_keys)

    # A whole segmenter's file is loaded strictly, head included.
    whole = tmp_path / "lraspp.pt"
    torch.save(model.state_dict(), whole)
    again, whole_source = build_fp32(
        ModelConfig(name="lraspp_mobilenet_v3_large", weights=str(whole)), 11, image_size=64,
        dense=True,
    )  # fmt: skip
    assert not isinstance(whole_source, BackboneWeightsSource)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key

    # A classifier that does not fill the backbone is refused, listing what is missing.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ConfigError, match=r"does not fill the backbone .* missing \("):
        build_fp32(
            ModelConfig(name="fcn_resnet50", weights=str(tmp_path / "r18.pt")), 11,
            image_size=64, dense=True,
        )  # fmt: skip


def test_resnet_backbone_leaves_only_fc_unused(tmp_path: Path) -> None:
    classifier = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pt"
    torch.save(classifier.state_dict(), path)
    cfg = ModelConfig(name="deeplabv3_resnet50", weights=str(path))
    model, source = build_fp32(cfg, 11, image_size=64, dense=True)
    assert source.name_mapping == "<name> -> backbone.<name>"
    assert sorted(source.unused_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.conv1.weight, classifier.conv1.weight)


def _quantized_convolutions(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """(convolutions, per-channel int8 weights) in a converted graph."""
    ops = collections.Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
    return ops["aten.conv2d.default"], ops["quantized_decomposed.dequantize_per_channel.default"]


@pytest.mark.int8_numeric
@pytest.mark.slow
@pytest.mark.parametrize("name", [UNET, "lraspp_mobilenet_v3_large"])
def test_qat_flow_trains_on_crops_and_runs_int8_on_full_frames(name: str) -> None:
    qat = QatModel.build(
        ModelConfig(name=name), QuantConfig(), num_classes=11, image_size=64, seed=0, dense=True
    )
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    target = torch.randint(0, 11, (2, 48, 64))
    for _ in range(2):
        out = qat.prepared(torch.randn(2, 3, 48, 64))
        logits = out["out"] if isinstance(out, dict) else out
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    int8 = qat.to_int8()
    convolutions, quantized = _quantized_convolutions(int8)
    assert convolutions > 0 and quantized == convolutions  # every convolution in int8
    compiled = compile_for_inference(int8)
    frame = torch.randn(1, 3, 72, 96)  # not the training crop's size
    with torch.no_grad():
        reference, fast = int8(frame), compiled(frame)
    reference = reference["out"] if isinstance(reference, dict) else reference
    fast = fast["out"] if isinstance(fast, dict) else fast
    assert fast.shape == reference.shape == (1, 11, 72, 96)
    # Rounding-level: the default target ("auto") keeps this CPU's int8 sums exact.
    scale = float(reference.abs().max())
    assert float((fast - reference).abs().max()) <= 0.05 * scale
