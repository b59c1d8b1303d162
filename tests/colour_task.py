"""A user task for the tests and docs/tasks.md: regress an image's mean colour.

Loaded by path, as a user would name a task of their own: `--task.name=tests/colour_task.py:
build` (relative to the working directory). The target is the mean of each normalised RGB
channel of the transformed image (3 numbers); the model has 3 outputs (`data.num_classes=3`);
the loss is the mean squared error, the primary metric `colour_mae` (mean absolute error, lower
is better) and a second one `colour_rmse`. The demo shards' `.cls` labels are never read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qatdist.config import DataConfig, TaskConfig
from qatdist.data.shards import RawSample, decode_image
from qatdist.tasks import Agreement, Metric, Task


class ColourError(Metric):
    """`totals` = [sum of |error|, sum of error^2, number of values]."""

    def __init__(self) -> None:
        self.totals = torch.zeros(3, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, target: torch.Tensor) -> None:
        error = (outputs.double() - target.double()).flatten()
        sums = [float(error.abs().sum()), float(error.square().sum()), error.numel()]
        self.totals += torch.tensor(sums, dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        abs_sum, square_sum, n = self.totals.tolist()
        if not n:
            return {"colour_mae": 0.0, "colour_rmse": 0.0}
        return {"colour_mae": abs_sum / n, "colour_rmse": (square_sum / n) ** 0.5}


class CloseEnough(Agreement):
    """Two models agree on a sample when their predictions differ by at most a tenth of the
    reference outputs' scale (every sample is comparable)."""

    def __init__(self) -> None:
        self.diffs: list[torch.Tensor] = []
        self.max_abs_diff = self.output_scale = 0.0

    def update(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        diff = (other.float() - reference.float()).abs().amax(dim=1)
        self.diffs.append(diff)
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        self.output_scale = max(self.output_scale, float(reference.abs().max()))

    def counts(self) -> tuple[int, int]:
        diffs = torch.cat(self.diffs) if self.diffs else torch.empty(0)
        return int((diffs <= 0.1 * self.output_scale).sum()), len(diffs)


class MeanColour(Task):
    name = "mean_colour"
    metric = "colour_mae"
    higher_is_better = False
    sample_extensions = ()  # an image is a whole sample

    def __init__(self, data_cfg: DataConfig) -> None:
        self.size = data_cfg.image_size
        self.mean = np.array(data_cfg.mean, np.float32)
        self.std = np.array(data_cfg.std, np.float32)

    def _input_and_target(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = (np.asarray(image, np.float32) / 255 - self.mean) / self.std
        return pixels.transpose(2, 0, 1).copy(), pixels.mean(axis=(0, 1))

    def decode(self, raw: RawSample) -> tuple[Image.Image, None]:
        return decode_image(raw, self.size), None  # the target comes from the image

    def train_transform(self) -> Callable:
        def transform(image: Image.Image, _, rng: np.random.Generator):
            if rng.random() < 0.5:  # a flip moves the input, not its mean colour
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return self._input_and_target(image)

        return transform

    def eval_transform(self) -> Callable:
        return lambda image, _: self._input_and_target(image)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, target)

    def distill_loss(self, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
        return F.mse_loss(outputs / temperature, teacher_outputs / temperature)

    def new_metric(self) -> ColourError:
        return ColourError()

    def new_agreement(self) -> CloseEnough:
        return CloseEnough()


def build(task_cfg: TaskConfig, data_cfg: DataConfig) -> MeanColour:
    if data_cfg.num_classes != 3:
        raise ValueError(
            f"the model must have 3 outputs (data.num_classes=3), not {data_cfg.num_classes}"
        )
    return MeanColour(data_cfg)
