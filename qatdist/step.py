"""One training step, shared by the trainer and the benchmarks, and its optional distillation
term from a frozen fp32 teacher."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qatdist.config import Config
from qatdist.models import build_fp32
from qatdist.models.weights import WeightsSource, load_weights


def build_teacher(
    cfg: Config, fp32_model: torch.nn.Module
) -> tuple[torch.nn.Module, WeightsSource | None]:
    """The distillation teacher and where its weights came from: `fp32_model` (the model as
    built, with model.weights; None) or, with train.distill_teacher_weights, the model.name
    architecture with those weights, e.g. an fp32 fine-tuning of the model on the same data: a
    teacher that already knows the data rather than the student's own starting point."""
    path = cfg.train.distill_teacher_weights
    if not path:
        return fp32_model, None
    teacher, _ = build_fp32(
        dataclasses.replace(cfg.model, weights=""),
        cfg.data.num_classes,
        image_size=cfg.data.image_size,
    )
    return teacher, load_weights(teacher, path, "train.distill_teacher_weights")


class Distillation:
    """Knowledge distillation from a frozen fp32 teacher (`train.distill_weight`,
    `train.distill_temperature`): loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher/T ||
    student/T), Hinton's form (the T^2 keeps the gradient scale independent of T).

    The teacher is put in eval mode with every parameter frozen: it runs under `no_grad`, gets
    no gradient and is never given to an optimizer. `seconds` adds up its forward time.
    """

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float):
        if not 0 < weight <= 1:
            raise ValueError(f"train.distill_weight: expected a number in (0, 1], got {weight}")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.weight, self.temperature = weight, temperature
        self.seconds = 0.0

    def loss(
        self, logits: torch.Tensor, images: torch.Tensor, cross_entropy: torch.Tensor
    ) -> torch.Tensor:
        """The blended loss for the student's `logits` on `images`."""
        start = time.perf_counter()
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        self.seconds += time.perf_counter() - start
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return (1 - self.weight) * cross_entropy + self.weight * t * t * kl


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    distillation: Distillation | None = None,
    may_update: Callable[[float], bool] | None = None,
) -> tuple[float, int]:
    """Forward, loss, backward, optimizer step and LR step on one batch. Returns the batch's
    loss and its count of correct top-1 predictions.

    `distillation` adds the teacher's term to the loss. `may_update(loss)` is asked after the
    backward whether to apply the update (the non-finite guard); when it says no, the optimizer
    step is skipped but the LR schedule still advances, so it stays aligned with the step count.
    """
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    if distillation is not None:
        loss = distillation.loss(logits, images, loss)
    correct = int((logits.detach().argmax(dim=1) == labels).sum())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss_value = loss.item()
    if may_update is None or may_update(loss_value):
        optimizer.step()
    scheduler.step()
    return loss_value, correct
