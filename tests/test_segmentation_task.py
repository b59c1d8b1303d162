"""The segmentation task (`qatdist.tasks.segmentation`): the confusion-matrix metric against a
hand computation, ignore-index pixels that change neither loss nor metric, joint transforms
that keep image and label map aligned, class weights from the shards, pixel agreement, and
ranks' matrices summed once over gloo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID_CLASSES, CAMVID_IGNORE, ROOT, torchrun
from PIL import Image

from qatdist.config import DEMO_SHARDS, ConfigError, DataConfig, TaskConfig, from_dict, validate
from qatdist.data.shards import read_shard
from qatdist.tasks.segmentation import (
    PALETTE,
    ConfusionMatrix,
    PixelAgreement,
    Segmentation,
    build,
    class_colours,
    class_weights,
    colourise,
    pixel_counts,
)

IGNORE = 255


def one_hot_logits(predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C, H, W) logits whose argmax is `predicted` (N, H, W)."""
    return torch.nn.functional.one_hot(predicted, num_classes).permute(0, 3, 1, 2).float()


def task(**task_kw) -> Segmentation:
    data_cfg = DataConfig(num_classes=3, hflip=0.5, mean=[0.5] * 3, std=[0.25] * 3)
    return Segmentation(TaskConfig(ignore_index=IGNORE, **task_kw), data_cfg)


def test_miou_of_a_known_confusion_matrix_is_the_hand_computation() -> None:
    # Ground truth / prediction per pixel, one 2x6 frame; class 2 never in the ground truth.
    truth = torch.tensor([[0, 0, 0, 0, 1, 1], [1, 1, IGNORE, IGNORE, 0, 0]])
    predicted = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 1, 2, 0, 0]])
    metric = ConfusionMatrix(3, IGNORE, ["sky", "sign/symbol", "car"])
    metric.update(one_hot_logits(predicted[None], 3), truth[None])
    # truth\pred   0  1  2
    #   0          5  1  0
    #   1          0  2  2
    #   2          0  0  0
    assert metric.matrix().tolist() == [[5, 1, 0], [0, 2, 2], [0, 0, 0]]
    assert metric.totals.dtype == torch.float64 and metric.totals.shape == (9,)
    # IoU_0 = 5 / (6 + 5 - 5) = 5/6, IoU_1 = 2 / (4 + 3 - 2) = 2/5, IoU_2 = 0 / 2 = 0;
    # class 2 is not in the ground truth: the mean is over classes 0 and 1.
    values = metric.compute()
    assert list(values)[0] == "miou"
    assert values["miou"] == pytest.approx((5 / 6 + 2 / 5) / 2)
    assert values["pixel_accuracy"] == pytest.approx(7 / 10)
    assert values["iou_sky"] == pytest.approx(5 / 6)
    assert values["iou_sign_symbol"] == pytest.approx(2 / 5)
    assert values["iou_car"] == 0.0
    # merge adds another accumulator's matrix
    other = ConfusionMatrix(3, IGNORE, [])
    other.merge(metric)
    other.merge(metric)
    assert other.matrix().tolist() == [[10, 2, 0], [0, 4, 4], [0, 0, 0]]
    assert set(other.compute()) == {"miou", "pixel_accuracy", "iou_0", "iou_1", "iou_2"}


@pytest.mark.parametrize("weighting", [None, torch.tensor([0.2, 1.0, 3.0])])
def test_ignore_pixels_change_neither_loss_nor_metric(weighting) -> None:
    t = task(aux_weight=0.4)
    t.weights = weighting
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 10), generator=g)
    target[:, :3, :] = IGNORE
    outputs = {"out": torch.randn(2, 3, 8, 10, generator=g), "aux": torch.randn(2, 3, 8, 10)}
    changed = {key: value.clone() for key, value in outputs.items()}
    ignored = (target == IGNORE)[:, None].expand(-1, 3, -1, -1)
    for value in changed.values():
        value[ignored] = torch.randn(int(ignored.sum()), generator=g) * 50
    assert not torch.equal(changed["out"], outputs["out"])
    assert torch.equal(t.loss(changed, target), t.loss(outputs, target))
    metrics = []
    for o in (outputs, changed):
        m = t.new_metric()
        m.update(o, target)
        metrics.append(m.totals)
    assert torch.equal(*metrics) and metrics[0].sum() == target.ne(IGNORE).sum()
    # The aux head adds its own weighted cross-entropy; a frame with no labelled pixel, 0.
    plain = t.loss(outputs["out"], target)
    assert t.loss(outputs, target) == pytest.approx(
        float(plain + 0.4 * t.loss(outputs["aux"], target))
    )
    nothing = torch.full_like(target, IGNORE)
    assert t.loss(outputs, nothing).item() == 0.0


def test_distill_loss_per_pixel() -> None:
    t = task()
    logits = torch.randn(2, 3, 4, 5)
    assert t.distill_loss({"out": logits}, logits.clone(), 2.0).item() == pytest.approx(0, abs=1e-7)
    assert t.distill_loss(logits, logits.flip(1), 2.0).item() > 0


def pattern(width: int = 96, height: int = 64) -> tuple[Image.Image, np.ndarray]:
    """A frame of 16-pixel blocks whose colour says the block's class; the layout is neither
    left-right symmetric nor periodic, so a flip or shift of one of them alone is seen."""
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    y, x = np.mgrid[:height, :width]
    labels = ((x // 16) * (x // 16 + 1) // 2 + y // 16) % 3
    labels = labels.astype(np.uint8)
    return Image.fromarray(palette[labels], "RGB"), labels


def colour_class(image: np.ndarray) -> np.ndarray:
    """The block class from the (un-normalised) colour: its brightest channel."""
    return image.argmax(axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_joint_transforms_keep_image_and_labels_aligned(seed: int) -> None:
    t = task(scale_range=[0.5, 2.0], crop_size=[48, 64])
    transform = t.train_transform()
    image, labels = pattern()
    before = torch.get_rng_state()
    x, y = transform(image, labels, np.random.default_rng(seed))
    assert torch.equal(torch.get_rng_state(), before)  # only the sample's rng is drawn from
    assert x.shape == (3, 48, 64) and x.dtype == np.float32 and y.shape == (48, 64)
    assert y.dtype == np.int64
    # Labels are resized with nearest neighbour: only classes and the padding's ignore index.
    assert set(np.unique(y).tolist()) <= {0, 1, 2, IGNORE}
    pixels = x * 0.25 + 0.5  # undo the normalisation (mean 0.5, std 0.25)
    labelled = y != IGNORE
    # Inside the blocks (labels equal 2 pixels around: bilinear blending with antialiasing
    # touches block edges only), the colour says the label.
    padded = np.pad(y, 2, mode="edge")
    inside = labelled & np.all(
        [padded[2 + dy : 50 + dy, 2 + dx : 66 + dx] == y for dy in (-2, 2) for dx in (-2, 2)],
        axis=0,
    )
    assert inside.sum() >= 100
    assert (colour_class(pixels) == y)[inside].all()
    # Where padded, the image is black and the label is the ignore index.
    assert np.all(pixels[:, ~labelled] < 0.01)
    again = transform(image, labels, np.random.default_rng(seed))
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)


def test_joint_transforms_flip_scale_and_pad() -> None:
    image, labels = pattern()
    flipped = task(scale_range=[1.0, 1.0]).train_transform()
    outs = [flipped(image, labels, np.random.default_rng(s))[1] for s in range(12)]
    as_is = [np.array_equal(o, labels) for o in outs]
    mirrored = [np.array_equal(o, labels[:, ::-1]) for o in outs]
    assert all(a or m for a, m in zip(as_is, mirrored)) and any(as_is) and any(mirrored)
    # Scaled to half, then cropped to more than the frame: the label is padded with IGNORE.
    small = task(scale_range=[0.5, 0.5], crop_size=[48, 64]).train_transform()
    _, y = small(image, labels, np.random.default_rng(0))
    assert (y != IGNORE).sum() == 32 * 48
    big = task(scale_range=[2.0, 2.0]).train_transform()
    x, y = big(image, labels, np.random.default_rng(0))
    assert y.shape == (128, 192) and x.shape == (3, 128, 192)


def test_eval_transform_full_frame_or_configured_size() -> None:
    image, labels = pattern()
    x, y = task().eval_transform()(image, labels)
    assert x.shape == (3, 64, 96) and np.array_equal(y, labels)
    x, y = task(eval_size=[32, 48]).eval_transform()(image, labels)
    assert x.shape == (3, 32, 48) and np.array_equal(y, labels[::2, ::2])


def test_class_weights_by_hand() -> None:
    counts = np.array([60, 30, 10, 0])
    frame_pixels = np.array([100, 100, 50, 0])
    median = class_weights("median_frequency", counts, frame_pixels)
    # f = [0.6, 0.3, 0.2], median 0.3
    assert median.tolist() == pytest.approx([0.5, 1.0, 1.5, 0.0])
    inverse_log = class_weights("inverse_log", counts, frame_pixels)
    share = np.array([0.6, 0.3, 0.1])
    assert inverse_log.tolist()[:3] == pytest.approx((1 / np.log(1.02 + share)).tolist())
    assert class_weights("none", counts, frame_pixels) is None


def test_pixel_agreement() -> None:
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 4, 6, 7, generator=g) * 3
    meter = PixelAgreement()
    meter.update({"out": reference}, reference.clone())
    assert meter.result() == {
        "agreement": 1.0,
        "comparable": 2 * 6 * 7,
        "max_abs_diff": 0.0,
        "output_scale": float(reference.abs().max()),
    }
    other = reference.clone()
    other[0, :, 0, 0] = reference[0, :, 0, 0].flip(0) * 10  # one pixel changes its mind
    meter = PixelAgreement()
    meter.update(reference, other)
    result = meter.result()
    assert result["max_abs_diff"] == float((other - reference).abs().max())
    assert result["comparable"] < 2 * 6 * 7  # only pixels decided beyond the difference


def test_label_maps_drawn_in_the_palette_with_ignored_pixels_black() -> None:
    labels = torch.tensor([[[0, 1, IGNORE], [2, 2, 0]]])
    pictures = colourise(labels, class_colours(3))
    assert pictures.dtype == torch.uint8 and pictures.shape == (1, 3, 2, 3)
    expected = [[PALETTE[0], PALETTE[1], (0, 0, 0)], [PALETTE[2], PALETTE[2], PALETTE[0]]]
    assert pictures[0].permute(1, 2, 0).tolist() == [[list(c) for c in row] for row in expected]
    # Past the fixed palette, still one distinct colour per class, none of them black.
    many = class_colours(40)
    assert len({tuple(c) for c in many.tolist()}) == 40 and [0, 0, 0] not in many.tolist()


def test_frame_and_prediction_pictures() -> None:
    t = task(class_names=["sky", "road", "car"])
    labels = torch.tensor([[[0, 1], [2, IGNORE]]])
    inputs = (torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2) - 0.5) / 0.25
    pictures = t.frame_images(inputs, labels)
    assert pictures["image"].dtype == torch.uint8
    assert pictures["image"][0, :, 0, 0].tolist() == [0, 128, 255]  # normalisation undone
    assert torch.equal(pictures["ground_truth"], colourise(labels, class_colours(3)))
    predicted = torch.tensor([[[2, 2], [1, 0]]])
    drawn = t.prediction_images({"out": one_hot_logits(predicted, 3)})
    assert torch.equal(drawn, colourise(predicted, class_colours(3)))
    legend = t.frame_legend()
    for line in ("| 1 | road | (128, 0, 0) #800000 |", f"| {IGNORE} | ignored"):
        assert line in legend


def test_config_keys_are_checked() -> None:
    demo = {**DEMO_SHARDS, "generate_demo": True}  # shards that need not exist yet
    validate(from_dict({"task": {"ignore_index": 11, "crop_size": [64, 96]}, "data": demo}))
    for bad, message in (
        ({"class_weighting": "median"}, "task.class_weighting"),
        ({"ignore_index": 300}, "task.ignore_index"),
        ({"crop_size": [64]}, "task.crop_size"),
        ({"scale_range": [2.0, 1.0]}, "task.scale_range"),
        ({"class_names": ["a", "b"]}, "task.class_names"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate(from_dict({"task": bad, "data": demo}))
    with pytest.raises(ConfigError, match="log.val_frames"):
        validate(from_dict({"log": {"val_frames": -1}, "data": demo}))


def test_class_weights_from_the_camvid_slice(camvid_tiny: dict) -> None:
    urls = sorted(str(p) for p in Path(camvid_tiny["root"], "shards").glob("train-*.tar"))
    counts, frame_pixels = pixel_counts(urls, CAMVID_CLASSES, CAMVID_IGNORE)
    total = 64 * 48 * sum(1 for url in urls for _ in read_shard(url, raise_errors=True))
    ignored = total - counts.sum()
    assert counts.sum() > 0 and ignored >= 0 and (frame_pixels >= counts).all()
    data_cfg = DataConfig(train_shards=camvid_tiny["train_shards"], num_classes=CAMVID_CLASSES)
    t = build(TaskConfig(ignore_index=CAMVID_IGNORE, class_weighting="median_frequency"), data_cfg)
    present = counts > 0
    assert (t.weights[torch.from_numpy(present)] > 0).all()
    assert (t.weights[torch.from_numpy(~present)] == 0).all()
    freq = counts[present] / frame_pixels[present]
    assert t.weights[torch.from_numpy(present)].tolist() == pytest.approx(
        (np.median(freq) / freq).tolist()
    )


WORKER = Path(__file__).resolve().parent / "seg_confusion_worker.py"


def test_ranks_confusion_matrices_summed_exactly_once(tmp_path: Path) -> None:
    """Two real processes over gloo: each accumulates its own frames; the reduced matrix is the
    sum of the two local ones (not twice it, not one rank's)."""
    result = torchrun([str(WORKER), str(tmp_path)], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    local = [np.array(r["local"]) for r in ranks]
    assert not np.array_equal(local[0], local[1])
    for r in ranks:
        assert np.array_equal(np.array(r["summed"]), local[0] + local[1])
        expected = ConfusionMatrix(CAMVID_CLASSES, CAMVID_IGNORE, [])
        expected.totals = torch.tensor(local[0] + local[1], dtype=torch.float64)
        assert r["values"] == expected.compute()
