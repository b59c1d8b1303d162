"""A small CNN for multi-process tests, used as `--model.name=tests.tiny_model:tiny_cnn` from the
repository root. It has no BatchNorm on purpose: whenever a graph has one, torchao's convert_pt2e
folds conv-BN by exporting a set of pattern graphs (many seconds on this machine kind, even
limited to the conv types present), which would dominate every short run."""

from __future__ import annotations

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
