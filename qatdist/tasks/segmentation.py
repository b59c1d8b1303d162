"""Semantic segmentation (`task.name = "segmentation"`): a sample is an image and its label map
(`<key>.seg.png`, one class index per pixel, `task.ignore_index` for unlabelled pixels), the
model returns per-pixel logits `(N, C, H, W)` or torchvision's dict `{"out", "aux"}`, the loss
is cross-entropy ignoring unlabelled pixels (optionally class-weighted, plus the auxiliary
head's), the metric a confusion matrix (mean IoU over the classes present in the ground truth,
pixel accuracy, per-class IoU), and two int8 implementations agree per pixel where the
reference's top-2 margin is wider than their measured logit difference.

The train transform moves image and label map together with `torchvision.transforms.v2` (a
`tv_tensors.Mask` is resized with nearest neighbour and padded with the ignore index by type):
random scale of the frame (`task.scale_range`), random crop (`task.crop_size`), horizontal flip
(`data.hflip`). Its randomness comes from the torch RNG seeded from the sample's `rng`, inside
`torch.random.fork_rng`, so a resumed run is bit-exact and the global RNG is left untouched.
"""

from __future__ import annotations

import colorsys
import logging
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from qatdist.config import ConfigError, DataConfig, TaskConfig
from qatdist.data.label_maps import LABEL_MAP_EXTENSION, decode_segmentation_sample
from qatdist.data.shards import RawSample, read_shard
from qatdist.tasks.base import Agreement, Metric, Outputs, Task

log = logging.getLogger(__name__)


def logits_of(outputs: Outputs) -> torch.Tensor:
    """The main per-pixel logits: `out` of a dict, else the tensor itself."""
    return outputs["out"] if isinstance(outputs, dict) else outputs


class ConfusionMatrix(Metric):
    """Pixels counted by (true class, predicted class), ignore-index pixels left out. `totals`
    is the flattened C x C matrix (row = ground truth) in float64: exact up to 2^53 pixels."""

    def __init__(self, num_classes: int, ignore_index: int, class_names: list[str]) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.keys = [
            "iou_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
            for name in (class_names or [str(c) for c in range(num_classes)])
        ]
        self.totals = torch.zeros(num_classes * num_classes, dtype=torch.float64)

    def update(self, outputs: Outputs, target: torch.Tensor) -> None:
        logits = logits_of(outputs)
        if logits.dim() != 4 or logits.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"segmentation logits of shape {tuple(logits.shape)} for label maps of shape "
                f"{tuple(target.shape)}: expected (N, C, H, W) logits at the label maps' size"
            )
        labels = target.reshape(-1).long()
        predicted = logits.argmax(dim=1).reshape(-1)
        labelled = labels != self.ignore_index
        index = labels[labelled] * self.num_classes + predicted[labelled]
        self.totals += torch.bincount(index, minlength=self.num_classes**2).double()

    def matrix(self) -> torch.Tensor:
        """The C x C matrix (row = true class, column = predicted class)."""
        return self.totals.view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        """`miou` (mean IoU over the classes present in the ground truth; 0 when no pixel is
        labelled), `pixel_accuracy`, and `iou_<class>` for each class that is in the ground
        truth or the predictions (a class in neither has no IoU)."""
        m = self.matrix()
        hits, truth, predicted = m.diagonal(), m.sum(dim=1), m.sum(dim=0)
        union = truth + predicted - hits
        iou = hits / union.clamp_min(1)
        present = truth > 0
        values = {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(hits.sum() / m.sum()) if m.sum() > 0 else 0.0,
        }
        for c, key in enumerate(self.keys):
            if union[c] > 0:
                values[key] = float(iou[c])
        return values


# Class colours: SegNet's CamVid palette (sky, building, pole, road, pavement, tree,
# sign/symbol, fence, car, pedestrian, bicyclist), then Cityscapes' colours for the classes
# CamVid lacks; classes past these get colours spread around the hue circle.
PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 80, 100),
)
IGNORED_COLOUR = (0, 0, 0)
"""Pixels of the ignore index (and any other label outside the classes) are drawn black."""


def class_colours(num_classes: int) -> torch.Tensor:
    """uint8 (num_classes, 3): PALETTE's colours, then hues spaced by the golden ratio."""
    colours = list(PALETTE[:num_classes])
    for c in range(len(colours), num_classes):
        hue = (c * 0.618033988749895) % 1.0
        colours.append(tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.75, 0.9)))
    return torch.tensor(colours, dtype=torch.uint8).reshape(num_classes, 3)


def colourise(labels: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) pictures of (N, H, W) label maps: class c in `colours[c]`, every
    other value (the ignore index) black."""
    labels = labels.long()
    known = (labels >= 0) & (labels < colours.shape[0])
    table = torch.cat([colours, torch.tensor([IGNORED_COLOUR], dtype=torch.uint8)])
    index = torch.where(known, labels, colours.shape[0])
    return table[index].permute(0, 3, 1, 2).contiguous()


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per pixel, the gap between the largest and the second-largest class logit."""
    top2 = logits.float().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class PixelAgreement(Agreement):
    """Per-pixel argmax agreement with a reference, judged only where the reference decided: a
    pixel is comparable when the reference's top-2 margin there exceeds the max |logit
    difference| measured over all the pixels seen (kernels round differently by CPU; where the
    margin is narrower, either class is a legitimate answer)."""

    def __init__(self) -> None:
        self._agreeing: list[torch.Tensor] = []  # margins of the pixels that agree
        self._differing: list[torch.Tensor] = []  # margins of the pixels that differ
        self.max_abs_diff = 0.0
        self.output_scale = 0.0

    def update(self, reference: Outputs, other: Outputs) -> None:
        reference, other = logits_of(reference), logits_of(other)
        if reference.shape != other.shape or reference.dim() != 4:
            raise ValueError(
                f"logits of shape {tuple(reference.shape)} and {tuple(other.shape)}: "
                "expected two equal (N, C, H, W) shapes"
            )
        if reference.numel() == 0:
            return
        self.max_abs_diff = max(
            self.max_abs_diff, float((other.float() - reference.float()).abs().max())
        )
        self.output_scale = max(self.output_scale, float(reference.float().abs().max()))
        margins = top2_margin(reference).reshape(-1)
        same = (other.argmax(dim=1) == reference.argmax(dim=1)).reshape(-1)
        self._agreeing.append(margins[same])
        self._differing.append(margins[~same])

    def counts(self) -> tuple[int, int]:
        """(agreeing, comparable) pixel counts."""
        if not self._agreeing:
            return 0, 0
        agree = int((torch.cat(self._agreeing) > self.max_abs_diff).sum())
        differ = int((torch.cat(self._differing) > self.max_abs_diff).sum())
        return agree, agree + differ


def pixel_counts(
    pattern_urls: list[str], num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the pixels labelled with it, and the pixels of the frames it appears in
    (median frequency balancing's denominator), over every label map of the shards."""
    counts = np.zeros(num_classes, np.int64)
    frame_pixels = np.zeros(num_classes, np.int64)
    for url in pattern_urls:
        for raw in read_shard(url, raise_errors=True):
            _, labels = decode_segmentation_sample(raw, num_classes, ignore_index)
            here = np.bincount(labels.reshape(-1), minlength=max(num_classes, ignore_index + 1))
            here = here[:num_classes]
            counts += here
            frame_pixels += np.where(here > 0, labels.size, 0)
    return counts, frame_pixels


def class_weights(method: str, counts: np.ndarray, frame_pixels: np.ndarray) -> torch.Tensor | None:
    """Cross-entropy class weights from per-class pixel counts: 'median_frequency' (Eigen &
    Fergus: median(f) / f_c with f_c = count_c / pixels of the frames holding c),
    'inverse_log' (ENet: 1 / ln(1.02 + count_c / all labelled pixels)); None for 'none'. A
    class absent from the training data gets weight 0 (it cannot be learned from them)."""
    if method == "none":
        return None
    present = counts > 0
    weights = np.zeros(len(counts))
    if method == "median_frequency":
        freq = counts[present] / frame_pixels[present]
        weights[present] = np.median(freq) / freq
    elif method == "inverse_log":
        share = counts[present] / counts.sum()
        weights[present] = 1.0 / np.log(1.02 + share)
    else:
        raise ConfigError(f"task.class_weighting: unknown method {method!r}")
    return torch.tensor(weights, dtype=torch.float32)


class Segmentation(Task):
    """Semantic segmentation over `data.num_classes` classes (see the module docstring)."""

    name = "segmentation"
    metric = "miou"
    higher_is_better = True
    sample_extensions = (LABEL_MAP_EXTENSION,)
    dense_outputs = True

    def __init__(
        self,
        task_cfg: TaskConfig,
        data_cfg: DataConfig,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.task_cfg = task_cfg
        self.data_cfg = data_cfg
        self.num_classes = data_cfg.num_classes
        self.ignore_index = task_cfg.ignore_index
        self.weights = weights
        self.aux_head = task_cfg.aux_weight > 0
        self._mean = torch.tensor(data_cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(data_cfg.std, dtype=torch.float32).view(3, 1, 1)
        self._colours = class_colours(self.num_classes)  # the pictures' class colours

    # --- data -----------------------------------------------------------------------------

    def decode(self, raw: RawSample) -> tuple[Image.Image, np.ndarray]:
        return decode_segmentation_sample(raw, self.num_classes, self.ignore_index)

    def _normalised(self, image: torch.Tensor) -> np.ndarray:
        return ((image.float() / 255 - self._mean) / self._std).numpy()

    def train_transform(
        self,
    ) -> Callable[[Image.Image, np.ndarray, np.random.Generator], tuple]:
        crop = list(self.task_cfg.crop_size)
        low, high = self.task_cfg.scale_range
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: self.ignore_index}
        hflip = self.data_cfg.hflip

        def transform(image: Image.Image, labels: np.ndarray, rng: np.random.Generator):
            pixels = tv_tensors.Image(TF.pil_to_tensor(image))
            mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(labels)))
            # ScaleJitter reads its target size as (width, height): the frame's own size
            # makes the drawn factor the scale of the frame.
            steps = [v2.ScaleJitter((mask.shape[1], mask.shape[0]), (low, high))]
            if crop:
                steps.append(v2.RandomCrop(crop, pad_if_needed=True, fill=fill))
            steps.append(v2.RandomHorizontalFlip(hflip))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**63)))
                pixels, mask = v2.Compose(steps)(pixels, mask)
            return self._normalised(pixels), mask.numpy().astype(np.int64)

        return transform

    def eval_transform(self) -> Callable[[Image.Image, np.ndarray], tuple]:
        size = list(self.task_cfg.eval_size)

        def transform(image: Image.Image, labels: np.ndarray):
            pixels = tv_tensors.Image(TF.pil_to_tensor(image))
            mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(labels)))
            if size and list(mask.shape) != size:
                pixels = TF.resize(pixels, size, antialias=True)
                mask = TF.resize(mask, size)  # nearest: the kernel for a Mask
            return self._normalised(pixels), mask.numpy().astype(np.int64)

        return transform

    # --- the model ------------------------------------------------------------------------

    def input_size(self, image_size: int) -> tuple[int, int]:
        """task.eval_size when set (the frames' size for full-frame evaluation), else the
        square data.image_size."""
        size = self.task_cfg.eval_size
        return (size[0], size[1]) if size else (image_size, image_size)

    def predictions(self, outputs: Outputs) -> torch.Tensor:
        return logits_of(outputs)

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not bool((target != self.ignore_index).any()):
            # mean over no pixel is 0/0; a batch of unlabelled crops teaches nothing
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=self.weights, ignore_index=self.ignore_index)

    def loss(self, outputs: Outputs, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of `out` (class-weighted with task.class_weighting), plus
        task.aux_weight times that of `aux` when the model returns one."""
        total = self._cross_entropy(logits_of(outputs), target)
        if isinstance(outputs, dict) and "aux" in outputs:
            total = total + self.task_cfg.aux_weight * self._cross_entropy(outputs["aux"], target)
        return total

    def distill_loss(
        self, outputs: Outputs, teacher_outputs: Outputs, temperature: float
    ) -> torch.Tensor:
        """KL(teacher/T || student/T) over the classes at each pixel, averaged over pixels."""
        t = temperature
        per_pixel = F.kl_div(
            F.log_softmax(logits_of(outputs) / t, dim=1),
            F.log_softmax(logits_of(teacher_outputs) / t, dim=1),
            reduction="none",
            log_target=True,
        ).sum(dim=1)
        return per_pixel.mean()

    # --- scoring --------------------------------------------------------------------------

    def new_metric(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.ignore_index, self.task_cfg.class_names)

    def new_agreement(self) -> PixelAgreement:
        return PixelAgreement()

    # --- pictures (TensorBoard) -----------------------------------------------------------

    def frame_images(self, inputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frames as the model sees them (normalisation undone) and their label maps in
        the class colours (`class_colours`, the ignore index black)."""
        pixels = (inputs.float() * self._std + self._mean).clamp(0, 1)
        return {
            "image": (pixels * 255).round().to(torch.uint8),
            "ground_truth": colourise(target, self._colours),
        }

    def prediction_images(self, outputs: Outputs) -> torch.Tensor:
        """Each pixel's predicted class (argmax of `out`) in the class colours."""
        return colourise(logits_of(outputs).argmax(dim=1), self._colours)

    def frame_legend(self) -> str:
        """A Markdown table: class index, name (task.class_names), colour (RGB and hex)."""
        names = self.task_cfg.class_names or [str(c) for c in range(self.num_classes)]
        rows = ["| index | class | colour (RGB) |", "| --- | --- | --- |"]
        for c, (name, rgb) in enumerate(zip(names, self._colours.tolist())):
            rows.append(f"| {c} | {name} | {tuple(rgb)} #{bytes(rgb).hex()} |")
        rows.append(
            f"| {self.ignore_index} | ignored (task.ignore_index) | {IGNORED_COLOUR} #000000 |"
        )
        return "\n".join(rows)


def build(task_cfg: TaskConfig, data_cfg: DataConfig) -> Segmentation:
    """The segmentation task; with task.class_weighting, the class weights are computed from
    every label map of data.train_shards (the same on every rank) and logged."""
    weights = None
    if task_cfg.class_weighting != "none":
        from qatdist.config import expand_shards

        urls = expand_shards(data_cfg.train_shards)
        counts, frame_pixels = pixel_counts(urls, data_cfg.num_classes, task_cfg.ignore_index)
        weights = class_weights(task_cfg.class_weighting, counts, frame_pixels)
        log.info(
            "task.class_weighting = %s: weights %s from %d labelled pixels",
            task_cfg.class_weighting,
            ", ".join(f"{w:.3g}" for w in weights.tolist()),
            int(counts.sum()),
        )
    return Segmentation(task_cfg, data_cfg, weights)
