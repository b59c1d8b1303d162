"""One training step, shared by the trainer and the benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[float, int]:
    """Forward, cross-entropy, backward, optimizer step and LR step on one batch. Returns the
    batch's loss and its count of correct top-1 predictions."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    correct = int((logits.detach().argmax(dim=1) == labels).sum())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item(), correct
