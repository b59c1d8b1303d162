"""Models: torchvision builders and user factories (`build`), and `model.weights` files in their
published layouts (`weights`)."""

from qatdist.models.build import SEGMENTATION_MODELS, build_fp32, build_model, tiny_vit
from qatdist.models.weights import (
    WeightsSource,
    load_backbone_weights,
    load_segmentation_weights,
    load_weights,
)

__all__ = [
    "SEGMENTATION_MODELS",
    "WeightsSource",
    "build_fp32",
    "build_model",
    "load_backbone_weights",
    "load_segmentation_weights",
    "load_weights",
    "tiny_vit",
]
