"""A small UNet for tests: `model.name = "tests/seg_unet.py:unet"`. Two encoder levels with
max pooling, a bottleneck, decoders that upsample bilinearly to the skip connection's size and
concatenate it, per-pixel logits at the input's size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class UNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2 = _block(3, width), _block(width, 2 * width)
        self.bottleneck = _block(2 * width, 4 * width)
        self.dec2, self.dec1 = _block(6 * width, 2 * width), _block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        up2 = F.interpolate(b, size=e2.shape[2:], mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up2, e2], dim=1))
        up1 = F.interpolate(d2, size=e1.shape[2:], mode="bilinear", align_corners=False)
        return self.head(self.dec1(torch.cat([up1, e1], dim=1)))


def unet(num_classes: int) -> nn.Module:
    return UNet(num_classes)
