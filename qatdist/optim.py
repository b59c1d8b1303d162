"""The optimizer and the learning-rate schedule of a training run."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from qatdist.config import OptimConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], o: OptimConfig, *, lr: float
) -> torch.optim.Optimizer:
    """SGD or AdamW (`o.name`) at peak rate `lr` (train.lr) with the fused CPU kernels: one
    vectorized pass per parameter (resnet18's SGD step: 6 ms instead of 18 ms on one core),
    which every DDP rank pays in full."""
    if o.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.momentum > 0,
            fused=True,
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, fused=True)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, o: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine decay over `total_steps` (see `warmup_cosine`), stepped per batch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            warmup_cosine,
            warmup=o.warmup_steps,
            total=total_steps,
            min_ratio=o.min_lr_ratio,
        ),
    )
