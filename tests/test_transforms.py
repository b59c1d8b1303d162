"""Data transforms the user controls: data.hflip, data.crop_scale, data.mean / data.std and a
data.transform factory, through the real shard reader and loader; resume stays bit-exact."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from qatdist import data
from qatdist.config import ConfigError, DataConfig
from qatdist.data import transforms
from qatdist.tasks.classification import Classification

SIZE = 16
SOURCE = 24  # stored images are larger than SIZE, so the transforms really resize


def _pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (SOURCE, SOURCE, 3), dtype=np.uint8)


@pytest.fixture()
def shards(tmp_path: Path) -> str:
    """Two shards of 12 random-noise PNGs (label = sample id), so no image is symmetric."""
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"t-{s}.tar")) as sink:
            for i in range(s * 12, s * 12 + 12):
                buf = io.BytesIO()
                Image.fromarray(_pixels(i)).save(buf, format="PNG")
                sink.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "cls": str(i)})
    return str(tmp_path / "t-{0..1}.tar")


@pytest.fixture()
def on_path(monkeypatch) -> None:
    """Make this module importable by name, for the data.transform factories below."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def make_cfg(pattern: str, **kw) -> DataConfig:
    args = {"image_size": SIZE, "num_classes": 24, "num_workers": 0, "shuffle_buffer": 4}
    return DataConfig(train_shards=pattern, val_shards=pattern, **(args | kw))


def train(cfg: DataConfig, **kw) -> list[data.Batch]:
    args = {"batch_size": 4, "steps": 8, "seed": 5, "epoch": 0, "rank": 0, "world_size": 1}
    return list(data.train_batches(cfg, Classification(cfg), **(args | kw)))


def val_images(cfg: DataConfig) -> torch.Tensor:
    return torch.cat(
        [
            b.images
            for b in data.val_batches(cfg, Classification(cfg), batch_size=8, rank=0, world_size=1)
        ]
    )


def test_hflip_setting_flips_decoded_shard_samples(shards: str) -> None:
    plain = train(make_cfg(shards, hflip=0.0, crop_scale=[1.0, 1.0]))
    flipped = train(make_cfg(shards, hflip=1.0, crop_scale=[1.0, 1.0]))
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a.target, b.target)
        assert torch.equal(b.images, a.images.flip(-1))
        assert not torch.equal(a.images, b.images)
    # crop_scale [1, 1] resizes the whole image: the same pixels as the evaluation transform.
    by_label = dict(zip(range(24), val_images(make_cfg(shards))))
    for batch in plain:
        for image, label in zip(batch.images, batch.target):
            assert torch.equal(image, by_label[int(label)])
    # The default probability 0.5 flips some samples and not others.
    half = train(make_cfg(shards, crop_scale=[1.0, 1.0]))
    kinds = {torch.equal(h, b) for x, y in zip(half, flipped) for h, b in zip(x.images, y.images)}
    assert kinds == {True, False}


def test_mean_and_std_change_the_normalised_values_exactly(shards: str) -> None:
    identity = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    custom = {"mean": [0.1, 0.5, 0.9], "std": [0.5, 0.25, 2.0]}
    mean = torch.tensor(custom["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(custom["std"], dtype=torch.float32).view(3, 1, 1)
    raw = val_images(make_cfg(shards, **identity))
    # Identity normalisation is pixels / 255 of the (centre-cropped, resized) image.
    assert raw.min() >= 0 and raw.max() <= 1
    expected = (raw - mean) / std
    assert torch.equal(val_images(make_cfg(shards, **custom)), expected)
    assert torch.equal(val_images(make_cfg(shards)), (raw - _default(0)) / _default(1))
    for a, b in zip(
        train(make_cfg(shards, **identity)), train(make_cfg(shards, **custom)), strict=True
    ):
        assert torch.equal(b.images, (a.images - mean) / std)


def _default(which: int) -> torch.Tensor:
    cfg = DataConfig()
    return torch.tensor([cfg.mean, cfg.std][which], dtype=torch.float32).view(3, 1, 1)


def first_pixel_factory(cfg: DataConfig):
    """A custom transform: every value is the sample's top-left red pixel plus a draw in
    {0, 1000} from the per-sample rng."""

    def transform(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        value = int(np.asarray(img)[0, 0, 0]) + 1000 * int(rng.integers(0, 2))
        return np.full((3, cfg.image_size, cfg.image_size), value, np.float32)

    return transform


def test_custom_transform_factory_is_used_and_resumes_exactly(shards: str, on_path) -> None:
    cfg = make_cfg(shards, transform="test_transforms:first_pixel_factory")
    transforms.check_transform(cfg)
    batches = train(cfg)
    draws = set()
    for batch in batches:
        for image, label in zip(batch.images, batch.target):
            value = float(image[0, 0, 0])
            draws.add(value >= 1000)
            assert value % 1000 == _pixels(int(label))[0, 0, 0]
            assert torch.equal(image, torch.full_like(image, value))
    assert draws == {True, False}
    assert_same(train(cfg, start_step=3), batches[3:])
    # Evaluation keeps the built-in resize and normalisation.
    assert torch.equal(val_images(cfg), val_images(make_cfg(shards)))


def assert_same(a: list[data.Batch], b: list[data.Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.target, y.target)


@pytest.mark.parametrize(
    "setting",
    [
        {"hflip": 0.0},
        {"hflip": 1.0, "crop_scale": [1.0, 1.0]},
        {"crop_scale": [0.2, 0.5], "mean": [0.5, 0.5, 0.5], "std": [0.1, 0.2, 0.3]},
    ],
    ids=["no-flip", "always-flip-resize-only", "hard-crop-custom-norm"],
)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_exact_for_every_setting(shards: str, setting, num_workers: int) -> None:
    cfg = make_cfg(shards, num_workers=num_workers, **setting)
    full = train(cfg)
    assert_same(train(cfg), full)
    assert_same(train(cfg, start_step=5), full[5:])


def wrong_shape_factory(cfg: DataConfig):
    return lambda img, rng: np.zeros((3, cfg.image_size + 1, cfg.image_size), np.float32)


def global_random_factory(cfg: DataConfig):
    return lambda img, rng: np.full((3, cfg.image_size, cfg.image_size), np.random.random())


def raising_factory(cfg: DataConfig):
    raise RuntimeError("no such augmentation")


def number_factory(cfg: DataConfig):
    return 3


NOT_A_FUNCTION = 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_qatdist:f", "cannot load factory.*ModuleNotFoundError"),
        ("test_transforms:no_such_function", "cannot load factory.*no_such_function"),
        ("test_transforms:NOT_A_FUNCTION", "is a int, not callable"),
        ("test_transforms:raising_factory", "raised RuntimeError: no such augmentation"),
        ("test_transforms:number_factory", "returned a int, not a function"),
        (
            "test_transforms:wrong_shape_factory",
            r"float32 array of shape \(3, 17, 16\); expected .*\(3, 16, 16\)",
        ),
        ("test_transforms:global_random_factory", "float64 array"),
    ],
)
def test_bad_transform_factory_is_a_config_error(spec: str, message: str, on_path) -> None:
    with pytest.raises(ConfigError, match=f"^data.transform: .*{message}"):
        transforms.check_transform(make_cfg("unused", transform=spec))


def global_random_float32_factory(cfg: DataConfig):
    def transform(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        return np.full((3, cfg.image_size, cfg.image_size), np.random.random(), np.float32)

    return transform


def test_transform_with_randomness_outside_its_rng_is_refused(on_path) -> None:
    cfg = make_cfg("unused", transform="test_transforms:global_random_float32_factory")
    with pytest.raises(ConfigError, match="data.transform: .*only from the rng"):
        transforms.check_transform(cfg)


def test_bad_transform_stops_training_before_any_process_group(shards: str, tmp_path: Path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qatdist.train",
            f"--data.train_shards={shards}",
            f"--data.val_shards={shards}",
            "--data.num_classes=24",
            "--data.transform=no_such_module_qatdist:build",
            f"--run.out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "data.transform: cannot load factory 'no_such_module_qatdist:build'" in result.stderr
    assert not (tmp_path / "run").exists()
