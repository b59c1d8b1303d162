"""A small CNN for multi-process tests, used as `--model.name=tests.tiny_model:tiny_cnn` from the
repository root. It has no BatchNorm on purpose: whenever a graph has one, torchao's convert_pt2e
folds conv-BN by exporting a set of pattern graphs (many seconds on this machine kind, even
limited to the conv types present), which would dominate every short run."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(num_classes: int) -> nn.Module:
    """Two conv-ReLU blocks, global average pooling and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def drop_connect(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """efficientnet_pytorch's drop connect: in training, each sample's branch is dropped with
    probability `p` (`rand` + `floor`), the rest scaled by 1 / (1 - p); identity in eval."""
    if not training:
        return x
    keep = 1.0 - p
    mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
    return x / keep * mask


class MBConvBlock(nn.Module):
    """An efficientnet_pytorch-style MBConv block: expand, depthwise, squeeze-excitation,
    project, and the residual through `drop_connect(x, p, training=self.training)`."""

    def __init__(self, channels: int, drop_connect_rate: float = 0.2):
        super().__init__()
        hidden = channels * 4
        self.drop_connect_rate = drop_connect_rate
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.ReLU()
        )
        self.se_reduce = nn.Conv2d(hidden, channels // 2, 1)
        self.se_expand = nn.Conv2d(channels // 2, hidden, 1)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.expand(x))
        squeezed = self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True))))
        y = self.project(y * torch.sigmoid(squeezed))
        return x + drop_connect(y, self.drop_connect_rate, training=self.training)


def drop_connect_cnn(num_classes: int) -> nn.Module:
    """A stem, two MBConv blocks with drop connect (a training-only random branch qatdist does
    not know by pattern), pooling and a linear classifier. No BatchNorm, as `tiny_cnn`."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        MBConvBlock(8),
        MBConvBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )
