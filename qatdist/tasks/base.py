"""The Task interface: everything that depends on what the model predicts.

The trainer, the baselines, the accuracy budget, finalize, export and the monitor ask a Task and
know nothing of "top-1" or "cross-entropy". A task says

- how a shard sample decodes into `(input, target)` and how the pair is transformed for training
  and evaluation (jointly, where the target is spatial), and how samples collate into a batch;
- how the model is called in training and what the loss is (`outputs` is whatever the model
  returns: a tensor, or a dict such as torchvision segmentation models' `{"out", "aux"}`; a
  detector in train mode returns its own loss dict, which `loss` then sums);
- the metric: an accumulator whose state is one float64 tensor of sums, so that every rank's
  state is summed with one collective (`qatdist.tasks.evaluate`), and whose `compute()` returns
  a dict with the primary metric (`Task.metric`) first;
- how two models' outputs are compared for agreement (compiled int8 against its reference).

Built-in tasks are named by `task.name` (`qatdist.config.BUILTIN_TASKS`); a user's own task is
`task.name = "package.module:function"` or `"path/to/file.py:function"`, a function called as
`function(task_cfg, data_cfg)` that returns a Task (docs/tasks.md).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from qatdist.data.shards import RawSample

Outputs = Any
"""What a model returns: a tensor, or a dict of tensors (e.g. {"out", "aux"})."""
Target = Any
"""A sample's or a batch's target: a label, a label map, a list of boxes... the task decides."""


class Metric(abc.ABC):
    """Accumulates a metric over batches. All state lives in `totals`, a 1-D float64 tensor of
    sums, so ranks combine by summing it once; `compute()` derives the values from it."""

    totals: torch.Tensor

    @abc.abstractmethod
    def update(self, outputs: Outputs, target: Target) -> None:
        """Add one batch (outputs as the model returned them, the batch's target)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values, the task's primary metric first."""

    def merge(self, other: Metric) -> None:
        """Add another accumulator's sums (e.g. over steps of a logging window)."""
        self.totals += other.totals


class Agreement(abc.ABC):
    """Compares a model's outputs with a reference's over batches (the compiled int8 model
    against the converted reference, an AOTI package or OpenVINO IR against it). `update`
    keeps `max_abs_diff` (largest |difference| of the compared outputs) and `output_scale` (the
    reference outputs' scale, e.g. their largest |value|), so that the difference can be judged
    relative to it; `counts` says how many predictions agree."""

    max_abs_diff: float = 0.0
    output_scale: float = 0.0

    @abc.abstractmethod
    def update(self, reference: Outputs, other: Outputs) -> None:
        """Add one batch of both models' outputs on the same inputs."""

    @abc.abstractmethod
    def counts(self) -> tuple[int, int]:
        """(agreeing, comparable) predictions so far."""

    def result(self) -> dict[str, float | int | None]:
        """`agreement` (fraction of comparable predictions that agree, None when none is
        comparable), `comparable`, `max_abs_diff` and `output_scale`."""
        agree, comparable = self.counts()
        return {
            "agreement": agree / comparable if comparable else None,
            "comparable": comparable,
            "max_abs_diff": self.max_abs_diff,
            "output_scale": self.output_scale,
        }


class Task(abc.ABC):
    """What a model predicts, end to end. Subclasses set `name` and `metric`."""

    name: str
    """The task's name as written into the report (`task`)."""
    metric: str
    """The primary metric's name (classification: top-1; segmentation: miou): report keys are
    `<baseline>_<metric>`."""
    higher_is_better: bool = True

    # --- data -------------------------------------------------------------------------------

    sample_extensions: tuple[str, ...]
    """Shard member extensions, besides the image, that make a sample complete (e.g. ('cls',));
    the loader counts samples by them."""

    @abc.abstractmethod
    def decode(self, raw: RawSample) -> tuple[Image.Image, Target]:
        """(RGB image, target) of one shard sample; `DataError` naming shard and key when it
        cannot be read."""

    @abc.abstractmethod
    def train_transform(self) -> Callable[[Image.Image, Target, np.random.Generator], tuple]:
        """`f(image, target, rng) -> (input array or tensor, target)`: the train augmentation,
        drawing randomness only from `rng` (resumed runs are bit-exact because of it)."""

    @abc.abstractmethod
    def eval_transform(self) -> Callable[[Image.Image, Target], tuple]:
        """`f(image, target) -> (input, target)`: the deterministic evaluation transform."""

    def collate(self, inputs: list, targets: list) -> tuple[torch.Tensor, Target]:
        """One batch from transformed samples: the inputs stacked into one contiguous tensor,
        the targets by `torch.utils.data.default_collate` (ints -> an int64 tensor, arrays ->
        a stacked tensor). A task whose targets differ in shape per sample (a detector's boxes)
        overrides it, e.g. to keep a list."""
        stacked = np.stack([np.asarray(x) for x in inputs])
        return torch.from_numpy(np.ascontiguousarray(stacked)), default_collate(targets)

    # --- the model --------------------------------------------------------------------------

    dense_outputs: bool = False
    """The model predicts per pixel (segmentation): built by the per-pixel builders and captured
    with dynamic height and width, so that it trains on crops and runs on full frames."""
    aux_head: bool = False
    """Build the model with its auxiliary head where it has one (the task's loss uses it)."""

    def input_size(self, image_size: int) -> tuple[int, int]:
        """(height, width) of the inputs the final measurements feed (latency, the saved
        program's example); the default is the square `data.image_size`."""
        return image_size, image_size

    def train_forward(
        self, model: torch.nn.Module, inputs: torch.Tensor, target: Target
    ) -> Outputs:
        """The training forward; a detector that takes targets in train mode overrides it."""
        return model(inputs)

    @abc.abstractmethod
    def predictions(self, outputs: Outputs) -> torch.Tensor:
        """The main prediction tensor in `outputs` (the logits; `out` of a dict): what the
        final checks compare between two calls and what `reference_io.pt` keeps."""

    @abc.abstractmethod
    def loss(self, outputs: Outputs, target: Target) -> torch.Tensor:
        """The training loss of a batch."""

    @abc.abstractmethod
    def distill_loss(
        self, outputs: Outputs, teacher_outputs: Outputs, temperature: float
    ) -> torch.Tensor:
        """The divergence of the student's `outputs` from a frozen teacher's on the same
        inputs, both softened by `temperature` (classification: KL of the softmaxes). The
        trainer blends it Hinton's way: (1 - w) * loss + w * T^2 * distill_loss (the T^2 keeps
        the gradient scale independent of T)."""

    # --- scoring ----------------------------------------------------------------------------

    @abc.abstractmethod
    def new_metric(self) -> Metric:
        """An empty metric accumulator."""

    @abc.abstractmethod
    def new_agreement(self) -> Agreement:
        """An empty agreement meter."""

    # --- pictures (TensorBoard) -------------------------------------------------------------

    def frame_images(self, inputs: torch.Tensor, target: Target) -> dict[str, torch.Tensor]:
        """Pictures of a batch of validation samples, as the monitor shows them beside each
        model's predictions: {name: uint8 (N, 3, H, W)} (segmentation: `image`,
        `ground_truth`). The default, none: the task draws nothing and the monitor shows no
        frames."""
        return {}

    def prediction_images(self, outputs: Outputs) -> torch.Tensor:
        """One model's `outputs` on the batch `frame_images` drew, as uint8 (N, 3, H, W)
        pictures in the same colours. Called only for a task whose `frame_images` draws."""
        raise NotImplementedError(f"{type(self).__name__} draws no predictions")

    def frame_legend(self) -> str:
        """Markdown that says what the colours of the pictures mean ('' for nothing)."""
        return ""
