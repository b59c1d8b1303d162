"""One training step, shared by the trainer and the benchmarks, and its optional distillation
term from a frozen fp32 teacher."""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from collections.abc import Callable

import torch

from qatdist.config import ModelConfig
from qatdist.models import build_fp32
from qatdist.models.weights import WeightsSource, load_weights
from qatdist.tasks.base import Outputs, Target, Task


def build_teacher(
    model_cfg: ModelConfig,
    teacher_weights: str,
    fp32_model: torch.nn.Module,
    *,
    num_classes: int,
    image_size: int,
    dense: bool = False,
    aux_loss: bool = False,
) -> tuple[torch.nn.Module, WeightsSource | None]:
    """The distillation teacher and where its weights came from: `fp32_model` (the model as
    built, with model.weights; None) or, with `teacher_weights` (train.distill_teacher_weights),
    the model.name architecture with those weights, e.g. an fp32 fine-tuning of the model on the
    same data: a teacher that already knows the data rather than the student's own starting
    point. `dense`, `aux_loss`: as `build_fp32`'s (the task's model kind)."""
    if not teacher_weights:
        return fp32_model, None
    teacher, _ = build_fp32(
        dataclasses.replace(model_cfg, weights=""),
        num_classes,
        image_size=image_size,
        dense=dense,
        aux_loss=aux_loss,
    )
    return teacher, load_weights(teacher, teacher_weights, "train.distill_teacher_weights")


class Distillation:
    """Knowledge distillation from a frozen fp32 teacher (`train.distill_weight`,
    `train.distill_temperature`): loss = (1 - w) * task loss + w * T^2 * the task's
    `distill_loss` at temperature T (Hinton's form: the T^2 keeps the gradient scale
    independent of T).

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
        self, task: Task, outputs: Outputs, inputs: torch.Tensor, task_loss: torch.Tensor
    ) -> torch.Tensor:
        """The blended loss for the student's `outputs` on `inputs`."""
        start = time.perf_counter()
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        self.seconds += time.perf_counter() - start
        t = self.temperature
        divergence = task.distill_loss(outputs, teacher_outputs, t)
        return (1 - self.weight) * task_loss + self.weight * t * t * divergence


def detached(outputs: Outputs) -> Outputs:
    """`outputs` (a tensor or a dict of them) cut from the autograd graph."""
    if isinstance(outputs, dict):
        return {key: detached(value) for key, value in outputs.items()}
    return outputs.detach() if torch.is_tensor(outputs) else outputs


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    task: Task,
    inputs: torch.Tensor,
    target: Target,
    *,
    distillation: Distillation | None = None,
    may_update: Callable[[float], bool] | None = None,
) -> tuple[float, Outputs]:
    """Forward (`task.train_forward`), the task's loss, backward, optimizer step and LR step on
    one batch. Returns the batch's loss and the model's outputs, detached (for a train metric).

    `distillation` adds the teacher's term to the loss. `may_update(loss)` is asked after the
    backward whether to apply the update (the non-finite guard); when it says no, the optimizer
    step is skipped but the LR schedule still advances, so it stays aligned with the step count.
    """
    outputs = task.train_forward(model, inputs, target)
    loss = task.loss(outputs, target)
    if distillation is not None:
        loss = distillation.loss(task, outputs, inputs, loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss_value = loss.item()
    if may_update is None or may_update(loss_value):
        optimizer.step()
        scheduler.step()
    else:
        # Refused: the schedule still advances with the step count. torch warns when this is
        # the run's first scheduler step (no optimizer step yet), which is the intent here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            scheduler.step()
    return loss_value, detached(outputs)
