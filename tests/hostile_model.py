"""A small CNN with one quantization-hostile layer for accuracy-budget runs, used as
`--model.name=tests.hostile_model:hostile_cnn` from the repository root.

A constant 1e4 spike (a buffer, not trained) is added to conv2's input at a position conv2
never reads (1x1 kernel, stride 2, odd coordinates): in float it changes nothing and gets no
gradient, but conv2's per-tensor int8 input scale becomes 1e4/255, every real activation
rounds to 0 and the int8 model predicts one class. Keeping conv2 in fp32 removes the damage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPIKE = 1e4


class HostileCnn(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 1, stride=2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)
        spike = torch.zeros(1, 16, 1, 1)
        spike[0, 0] = SPIKE
        self.register_buffer("spike", spike)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        # the spike lands on (1, 1) only: a mask keeps the other positions as they were
        mask = torch.zeros_like(x[:1, :1])
        mask[..., 1, 1] = 1.0
        x = x + self.spike * mask
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def hostile_cnn(num_classes: int) -> nn.Module:
    return HostileCnn(num_classes)
