"""Model construction: torchvision classifiers by name or a user factory, local weights only."""

from __future__ import annotations

import torch
import torchvision

from qatdist.config import ConfigError, ModelConfig
from qatdist.factories import load_factory


def _from_factory(spec: str, num_classes: int) -> torch.nn.Module:
    model = load_factory(spec, "model.name")(num_classes=num_classes)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.name: factory {spec!r} returned {type(model).__name__}")
    return model


_AUX_HEADS = ("googlenet", "inception_v3")


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """An fp32 classifier with `num_classes` outputs; `cfg.weights` (a local state dict) is
    loaded strictly. Nothing is downloaded: torchvision models are built with weights=None."""
    if ":" in cfg.name:
        model = _from_factory(cfg.name, num_classes)
    else:
        known = torchvision.models.list_models(module=torchvision.models)
        if cfg.name not in known:
            raise ConfigError(
                f"model.name: unknown torchvision classification model {cfg.name!r} "
                "(or use 'package.module:function')"
            )
        # googlenet and inception_v3 default to auxiliary classifiers, whose extra outputs
        # only their own training recipe uses; the int8 model serves the main head (as
        # torchvision's quantized builders do), and the training step expects one output.
        extra = {"aux_logits": False} if cfg.name in _AUX_HEADS else {}
        model = torchvision.models.get_model(
            cfg.name, weights=None, num_classes=num_classes, **extra
        )
    if cfg.weights:
        try:
            state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # a bad file must name itself, whatever torch raised
            raise ConfigError(f"model.weights: cannot load {cfg.weights}: {e}") from None
    return model


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
