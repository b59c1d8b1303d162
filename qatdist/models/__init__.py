"""Models: torchvision builders and user factories (`build`), and `model.weights` files in their
published layouts (`weights`)."""

from qatdist.models.build import build_fp32, build_model, tiny_vit
from qatdist.models.weights import WeightsSource, load_weights

__all__ = ["WeightsSource", "build_fp32", "build_model", "load_weights", "tiny_vit"]
