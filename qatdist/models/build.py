"""Model construction: torchvision classifiers and segmentation models by name, or a user
factory; local weights only."""

from __future__ import annotations

import inspect

import torch
import torchvision

from qatdist.config import ConfigError, ModelConfig
from qatdist.config.factories import FORMS, describe_error, load_factory
from qatdist.models.weights import WeightsSource, load_segmentation_weights, load_weights

SEGMENTATION_MODELS = tuple(torchvision.models.list_models(module=torchvision.models.segmentation))
"""torchvision's segmentation builders (lraspp_mobilenet_v3_large, deeplabv3_*, fcn_*)."""


def _takes_num_classes(factory) -> bool:
    """Whether `factory` accepts a num_classes keyword (named, or through **kwargs as
    torchvision's builders do). A signature Python cannot read is assumed to take it."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind == p.VAR_KEYWORD
        or (p.name == "num_classes" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in parameters
    )


def _from_factory(spec: str, num_classes: int, image_size: int, dense: bool) -> torch.nn.Module:
    factory = load_factory(spec, "model.name")
    takes_num_classes = _takes_num_classes(factory)
    try:
        model = factory(num_classes=num_classes) if takes_num_classes else factory()
    except Exception as e:  # the factory is user code: any failure is a bad setting
        raise ConfigError(f"model.name: factory {spec!r} raised {describe_error(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.name: factory {spec!r} returned {type(model).__name__}")
    width = _output_width(model, spec, image_size, dense)
    if width != num_classes:
        called = "with num_classes" if takes_num_classes else "without num_classes (it takes none)"
        raise ConfigError(
            f"model.name: factory {spec!r}, called {called}, builds a model with {width} "
            f"outputs, but data.num_classes is {num_classes}; set data.num_classes = {width} "
            f"or use a factory that builds {num_classes} outputs"
        )
    return model


def _output_width(model: torch.nn.Module, spec: str, image_size: int, dense: bool) -> int:
    """The number of outputs (classes) of `model` on one zero image of `image_size`
    (data.image_size), in eval mode and without gradients, so neither its state (BatchNorm
    statistics) nor the RNG changes; each module's train/eval mode is put back. `dense`: the
    model predicts per pixel, `(N, C, H, W)` logits at the input's size or a dict whose `out`
    holds them."""
    shape = (1, 3, image_size, image_size)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as e:
        raise ConfigError(
            f"model.name: the model of factory {spec!r} fails on a {tuple(shape)} input "
            f"(data.image_size = {image_size}): {describe_error(e)}"
        ) from None
    finally:
        for module, training in modes:
            module.training = training
    if dense:
        logits = out.get("out") if isinstance(out, dict) else out
        if not isinstance(logits, torch.Tensor) or logits.shape[:1] + logits.shape[2:] != (
            1,
            image_size,
            image_size,
        ):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"model.name: the model of factory {spec!r} returns {got} for a {shape} input; "
                "expected per-pixel logits (batch, num_classes, height, width) at the input's "
                "size, or a dict holding them under 'out'"
            )
        return logits.shape[1]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.name: the model of factory {spec!r} returns {got} for a {shape} input; "
            "expected one logits tensor of shape (batch, num_classes)"
        )
    return out.shape[1]


_AUX_HEADS = ("googlenet", "inception_v3")


def _segmentation_model(name: str, num_classes: int, aux_loss: bool) -> torch.nn.Module:
    # lraspp has no auxiliary head (its builder takes no aux_loss)
    extra = {} if name.startswith("lraspp") else {"aux_loss": aux_loss}
    return torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=num_classes, **extra
    )


def build_fp32(
    cfg: ModelConfig,
    num_classes: int,
    *,
    image_size: int,
    dense: bool = False,
    aux_loss: bool = False,
) -> tuple[torch.nn.Module, WeightsSource | None]:
    """An fp32 model with `num_classes` outputs for `image_size` x `image_size` RGB inputs,
    with `cfg.weights` loaded (`qatdist.models.weights`), and where those weights came from
    (None without model.weights). Nothing is downloaded: torchvision models are built with
    weights=None. `dense` (segmentation): per-pixel logits; torchvision's segmentation models
    by name (with their auxiliary head when `aux_loss` and they have one), whose model.weights
    is a whole segmenter loaded strictly or an ImageNet classifier loaded into the backbone
    (`load_segmentation_weights`). A factory's output width is checked on one image of
    `image_size`."""
    if ":" in cfg.name:
        model = _from_factory(cfg.name, num_classes, image_size, dense)
    elif cfg.name in SEGMENTATION_MODELS:
        if not dense:
            raise ConfigError(
                f"model.name: {cfg.name!r} is a segmentation model; it needs "
                'task.name = "segmentation"'
            )
        model = _segmentation_model(cfg.name, num_classes, aux_loss)
        source = load_segmentation_weights(model, cfg.weights) if cfg.weights else None
        return model, source
    else:
        known = torchvision.models.list_models(module=torchvision.models)
        if cfg.name not in known:
            kind = "segmentation" if dense else "classification"
            names = f" ({', '.join(SEGMENTATION_MODELS)})" if dense else ""
            raise ConfigError(
                f"model.name: unknown torchvision {kind} model {cfg.name!r}{names} (or use {FORMS})"
            )
        if dense:
            raise ConfigError(
                f"model.name: {cfg.name!r} is a torchvision classifier; segmentation needs "
                f"one of {', '.join(SEGMENTATION_MODELS)} or a factory"
            )
        # googlenet and inception_v3 default to auxiliary classifiers, whose extra outputs
        # only their own training recipe uses; the int8 model serves the main head (as
        # torchvision's quantized builders do), and the training step expects one output.
        extra = {"aux_logits": False} if cfg.name in _AUX_HEADS else {}
        model = torchvision.models.get_model(
            cfg.name, weights=None, num_classes=num_classes, **extra
        )
    source = load_weights(model, cfg.weights) if cfg.weights else None
    return model, source


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    *,
    image_size: int,
    dense: bool = False,
    aux_loss: bool = False,
) -> torch.nn.Module:
    """`build_fp32`'s model, for callers that do not report where its weights came from."""
    return build_fp32(cfg, num_classes, image_size=image_size, dense=dense, aux_loss=aux_loss)[0]


def tiny_vit(num_classes: int) -> torch.nn.Module:
    """A 2-layer torchvision VisionTransformer for 32x32 images (patch 4, width 64, 2 heads);
    `model.name = "qatdist.models:tiny_vit"`."""
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=num_classes,
    )
