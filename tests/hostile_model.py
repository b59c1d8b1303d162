"""A small CNN with one quantization-hostile layer for accuracy-budget runs, used as
`--model.name=tests.hostile_model:hostile_cnn` from the repository root.

A constant 1e4 spike (a buffer, not trained) is added to conv2's input at a position conv2
never reads (1x1 kernel, stride 2, odd coordinates): in float it changes nothing and gets no
gradient, but conv2's per-tensor int8 input scale becomes 1e4/255, every real activation
rounds to 0 and the int8 model predicts one class. Keeping conv2 in fp32 removes the damage.
`two_hostile_cnn` does the same to conv3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPIKE = 1e4


class HostileCnn(nn.Module):
    """conv1, conv2 and conv3 (the last two 1x1, stride 2), pooling, fc; each layer named in
    `hostile` gets the spike in its input."""

    def __init__(self, num_classes: int, hostile: tuple[str, ...] = ("conv2",)):
        super().__init__()
        self.hostile = hostile
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 1, stride=2)
        self.conv3 = nn.Conv2d(16, 16, 1, stride=2)
        self.fc = nn.Linear(16, num_classes)
        spike = torch.zeros(1, 16, 1, 1)
        spike[0, 0] = SPIKE
        self.register_buffer("spike", spike)

    def _spiked(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        if layer not in self.hostile:
            return x
        # the spike lands on (1, 1) only, which the 1x1 stride-2 layer never reads
        mask = torch.zeros_like(x[:1, :1])
        mask[..., 1, 1] = 1.0
        return x + self.spike * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(self._spiked(x, "conv2")))
        x = F.relu(self.conv3(self._spiked(x, "conv3")))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def hostile_cnn(num_classes: int) -> nn.Module:
    """conv2 hostile."""
    return HostileCnn(num_classes)


def two_hostile_cnn(num_classes: int) -> nn.Module:
    """conv2 and conv3 hostile: keeping one of them in fp32 is not enough."""
    return HostileCnn(num_classes, hostile=("conv2", "conv3"))
