"""Image classification (`task.name = "classification"`, the default): a sample is an image and
a `.cls` integer label, the model returns `(N, C)` logits, the loss is cross-entropy, the
metric top-1, and two int8 implementations agree where the reference's top-2 margin is wider
than their measured logit difference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qatdist.config import DataConfig, TaskConfig
from qatdist.data import transforms
from qatdist.data.shards import (
    LABEL_EXTENSION,
    DataError,
    RawSample,
    decode_image,
    image_member,
)
from qatdist.tasks.base import Agreement, Metric, Task


class Top1(Metric):
    """Top-1 accuracy: `totals` = [correct, seen]."""

    def __init__(self) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, target: torch.Tensor) -> None:
        self.totals[0] += int((outputs.argmax(dim=1) == target).sum())
        self.totals[1] += target.shape[0]

    def compute(self) -> dict[str, float]:
        correct, seen = self.totals.tolist()
        return {"top1": correct / seen if seen else 0.0}


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per sample, the gap between the largest and the second-largest logit."""
    top2 = logits.float().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class DecidedAgreement(Agreement):
    """Top-1 agreement of a model with a reference, judged only where the reference decided.

    Two implementations of one int8 model (reference q/dq graph, Inductor kernels, AOTI) round
    differently by vendor and CPU; where the reference's top-2 logits are closer than the
    measured logit difference, either argmax is a legitimate answer. A sample is *comparable*
    when the reference's top-2 margin exceeds the max |logit difference| measured over all the
    samples seen (the number reported beside it).
    """

    def __init__(self) -> None:
        self._margins: list[torch.Tensor] = []
        self._same: list[torch.Tensor] = []
        self.max_abs_diff = 0.0
        self.output_scale = 0.0

    def update(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        if reference.shape != other.shape or reference.dim() != 2:
            raise ValueError(
                f"logits of shape {tuple(reference.shape)} and {tuple(other.shape)}: "
                "expected two equal (samples, classes) shapes"
            )
        if reference.shape[0] == 0:
            return
        diff = float((other.float() - reference.float()).abs().max())
        self.max_abs_diff = max(self.max_abs_diff, diff)
        self.output_scale = max(self.output_scale, float(reference.float().abs().max()))
        self._margins.append(top2_margin(reference))
        self._same.append(other.argmax(dim=1) == reference.argmax(dim=1))

    def counts(self) -> tuple[int, int]:
        """(agreeing, comparable) sample counts."""
        if not self._margins:
            return 0, 0
        decided = torch.cat(self._margins) > self.max_abs_diff
        return int((torch.cat(self._same) & decided).sum()), int(decided.sum())


def agreement_where_decided(reference: torch.Tensor, other: torch.Tensor) -> tuple[int, int]:
    """(agreeing, comparable) samples of `other` logits against `reference` logits: only
    samples whose reference top-2 margin exceeds the max |logit difference| between the two
    are comparable (see `DecidedAgreement`)."""
    meter = DecidedAgreement()
    meter.update(reference, other)
    return meter.counts()


def decode_label(raw: RawSample, num_classes: int) -> int:
    """The `.cls` member of a sample as an integer in [0, num_classes); DataError naming shard
    and key otherwise."""
    where = f"shard {raw.shard}, sample key {raw.key!r}"
    if LABEL_EXTENSION not in raw.files:
        raise DataError(f"{where}: missing label (.{LABEL_EXTENSION} member)")
    text = raw.files[LABEL_EXTENSION]
    try:
        label = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: label {text[:32]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside [0, {num_classes})")
    return label


class Classification(Task):
    """Image classification over `data.num_classes` classes (see the module docstring)."""

    name = "classification"
    metric = "top1"
    higher_is_better = True
    sample_extensions = (LABEL_EXTENSION,)

    def __init__(self, data_cfg: DataConfig) -> None:
        self.data_cfg = data_cfg

    def decode(self, raw: RawSample) -> tuple[Image.Image, int]:
        image_member(raw)  # a sample without image is named as such before its label is read
        label = decode_label(raw, self.data_cfg.num_classes)
        return decode_image(raw, self.data_cfg.image_size), label

    def train_transform(self) -> Callable[[Image.Image, int, np.random.Generator], tuple]:
        transform = transforms.train_transform(self.data_cfg)  # data.transform or built-in
        return lambda image, label, rng: (transform(image, rng), label)

    def eval_transform(self) -> Callable[[Image.Image, int], tuple]:
        transform = transforms.eval_transform(self.data_cfg)
        return lambda image, label: (transform(image), label)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, target)

    def distill_loss(
        self, outputs: torch.Tensor, teacher_outputs: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """KL(teacher/T || student/T) over the classes, averaged over the batch."""
        t = temperature
        return F.kl_div(
            F.log_softmax(outputs / t, dim=1),
            F.log_softmax(teacher_outputs / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )

    def new_metric(self) -> Top1:
        return Top1()

    def new_agreement(self) -> DecidedAgreement:
        return DecidedAgreement()


def build(task_cfg: TaskConfig, data_cfg: DataConfig) -> Classification:
    """The classification task of `data_cfg` (task_cfg holds no option of its own yet)."""
    return Classification(data_cfg)
