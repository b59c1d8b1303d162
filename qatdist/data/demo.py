"""Built-in procedural demo dataset: 10 classes of textured shapes on cluttered backgrounds.

A class is a (shape, texture) pair: 5 shapes x 2 textures. Everything else is drawn at random
and independently of the class (colours, contrast, size, position, rotation, background
gradient and faint background texture, clutter that may occlude the shape, pixel noise), so no
single cue such as mean colour or "is there a stripe anywhere" identifies a class. The draws
are calibrated so that a ResNet-18 learns the task in a few epochs without reaching 100%.

`ensure_demo_shards` writes the demo where configs/default.toml expects it (DEMO_SHARDS, relative
to the working directory) on first use, and nowhere else: a shard pattern the user typed is
never written to.
"""

from __future__ import annotations

import colorsys
import fcntl
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from qatdist.config import DEMO_DIR, DEMO_SHARDS, DataConfig, is_demo_pattern
from qatdist.data.shards import shard_pattern, write_shards

log = logging.getLogger(__name__)

SHAPES = ("disk", "square", "triangle", "plus", "ring")
TEXTURES = ("stripes", "checker")
CLASS_NAMES = tuple(f"{shape}-{texture}" for shape in SHAPES for texture in TEXTURES)
NUM_CLASSES = len(CLASS_NAMES)
_SPLITS = {"train": 0, "val": 1}

# Difficulty knobs (uniform ranges), calibrated with a short ResNet-18 run; see the docstring.
RADIUS = (0.28, 0.42)  # object radius as a fraction of the image size
ROTATION = 0.4  # object rotation range in radians, +-
HUE_SPREAD = 0.06  # object hue = class hue centre (label / 10) +- this: neighbours overlap
CLUTTER_BEHIND = (0, 3)  # distractors drawn before the object
CLUTTER_FRONT = (0, 1)  # distractors drawn over the object (upper bound exclusive)
FAINT_TEXTURE_PROB = 0.3  # chance of a faint stripe/checker background
TEXTURE_CONTRAST = (0.45, 0.75)  # brightness difference between the object's two tones
TEXTURE_FREQ = (1.0, 1.8)  # texture cells per object radius
NOISE_STD = (2, 8)  # Gaussian pixel noise


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in unit-radius shape coordinates (u, v)."""
    if shape == "disk":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return (v >= -0.55) & (v <= 1.0 - math.sqrt(3.0) * np.abs(u))
    if shape == "plus":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | (
            (np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)
        )
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Which of the two texture colours each pixel takes, at `freq` cells per unit length."""
    if texture == "stripes":
        return np.floor(u * freq).astype(np.int64) % 2 == 0
    if texture == "checker":
        return (np.floor(u * freq).astype(np.int64) + np.floor(v * freq).astype(np.int64)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    img[mask] = colour


def _clutter(img: np.ndarray, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> None:
    """One small distractor: a blob, a short thick line or a small rectangle, random colour."""
    size = img.shape[0]
    cx, cy = rng.uniform(0, size, 2)
    colour = rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    if kind == 0:
        r = rng.uniform(0.03, 0.08) * size
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif kind == 1:
        u, v = _rotate(xx - cx, yy - cy, rng.uniform(0, math.pi))
        mask = (np.abs(u) <= rng.uniform(0.1, 0.3) * size) & (np.abs(v) <= rng.uniform(0.6, 1.6))
    else:
        u, v = _rotate(xx - cx, yy - cy, rng.uniform(0, math.pi))
        mask = (np.abs(u) <= rng.uniform(0.03, 0.09) * size) & (
            np.abs(v) <= rng.uniform(0.03, 0.09) * size
        )
    _paint(img, mask, colour)


def draw(label: int, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Draw one (image_size, image_size, 3) uint8 image of class `label` using `rng`."""
    shape, texture = SHAPES[label // len(TEXTURES)], TEXTURES[label % len(TEXTURES)]
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Background: random colour with a random gradient, sometimes a faint texture of either kind
    # so that texture alone (without the shape) is no cue.
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(0, 255, 3)
    gx, gy = rng.uniform(-60, 60, 2) / size
    img += ((xx - size / 2) * gx + (yy - size / 2) * gy)[..., None] * rng.uniform(0.5, 1.5, 3)
    if rng.random() < FAINT_TEXTURE_PROB:
        u, v = _rotate(xx, yy, rng.uniform(0, math.pi))
        faint = _texture_mask(TEXTURES[rng.integers(2)], u, v, rng.uniform(0.1, 0.25))
        img += faint[..., None] * rng.uniform(-35, 35, 3)

    for _ in range(rng.integers(*CLUTTER_BEHIND)):
        _clutter(img, rng, xx, yy)

    # The object: its hue is drawn from a window around a class-specific centre; windows of
    # neighbouring classes overlap, so colour narrows the class down but never decides it. The
    # two texture tones share the hue and differ in brightness by a random contrast.
    radius = rng.uniform(*RADIUS) * size
    cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
    u, v = _rotate(xx - cx, yy - cy, rng.uniform(-ROTATION, ROTATION))
    u, v = u / radius, v / radius
    mask = _shape_mask(shape, u, v)
    tu, tv = _rotate(u, v, rng.uniform(0, math.pi))
    freq = rng.uniform(*TEXTURE_FREQ)
    tone = _texture_mask(texture, tu + rng.uniform(0, 2), tv + rng.uniform(0, 2), freq)
    hue = (label / NUM_CLASSES + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    value_a = rng.uniform(0.35, 1.0)
    value_b = value_a - math.copysign(rng.uniform(*TEXTURE_CONTRAST), value_a - 0.675)
    saturation = rng.uniform(0.5, 1.0)
    colour_a = np.array(colorsys.hsv_to_rgb(hue, saturation, value_a)) * 255
    colour_b = np.array(colorsys.hsv_to_rgb(hue, saturation, float(np.clip(value_b, 0, 1)))) * 255
    _paint(img, mask & tone, colour_a)
    _paint(img, mask & ~tone, colour_b)

    # Occluders on top of the object for some images.
    for _ in range(rng.integers(*CLUTTER_FRONT)):
        _clutter(img, rng, xx, yy)

    img += rng.normal(0, rng.uniform(*NOISE_STD), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def generate(
    num_per_class: int, seed: int, image_size: int = 64, *, split: str = "train"
) -> Iterator[tuple[Image.Image, int]]:
    """Yield `num_per_class * 10` (RGB PIL image, label) pairs, classes interleaved.

    Deterministic in (seed, split, image_size); `split` ('train' or 'val') selects an
    independent stream so that validation images never repeat training images.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    for index in range(num_per_class * NUM_CLASSES):
        label = index % NUM_CLASSES
        pixels = draw(label, _image_rng(seed, split, index), image_size)
        yield Image.fromarray(pixels, "RGB"), label


def _png_samples(
    num_per_class: int, seed: int, image_size: int, split: str
) -> Iterator[tuple[bytes, str, int]]:
    for image, label in generate(num_per_class, seed, image_size, split=split):
        buf = io.BytesIO()
        # compress_level=1: the demo is about training, not disk space; encoding stays cheap.
        image.save(buf, format="PNG", compress_level=1)
        yield buf.getvalue(), "png", label


def write_demo_split(
    paths: list[Path], num_per_class: int, seed: int, image_size: int, split: str
) -> None:
    """Write one split's demo samples spread evenly over the shard files `paths`."""
    samples = _png_samples(num_per_class, seed, image_size, split)
    write_shards(paths, samples, num_per_class * NUM_CLASSES, key_prefix=split)


def write_demo_shards(
    out_dir: str | Path,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    image_size: int = 64,
    shard_size: int = 500,
) -> tuple[str, str]:
    """Write train-NNNNNN.tar / val-NNNNNN.tar demo shards of at most `shard_size` samples.

    Returns the (train_pattern, val_pattern) brace patterns matching the written files.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patterns = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        count = max(1, math.ceil(per_class * NUM_CLASSES / shard_size))
        paths = [out / f"{split}-{i:06d}.tar" for i in range(count)]
        write_demo_split(paths, per_class, seed, image_size, split)
        patterns.append(shard_pattern(out, split, count))
    return patterns[0], patterns[1]


def _demo_paths(key: str) -> list[Path]:
    from braceexpand import braceexpand  # installed with webdataset

    return [Path(name) for name in braceexpand(DEMO_SHARDS[key])]


def ensure_demo_shards(cfg: DataConfig, seed: int) -> bool:
    """With cfg.generate_demo, write the demo splits whose data.train_shards / val_shards is
    the demo's own pattern (DEMO_SHARDS) and whose files are not all there. Other patterns are
    left alone (a pattern that matches nothing is a config error, see config_checks.validate).

    Shards are written to a temporary folder and renamed into place under a file lock, so
    concurrent runs (every rank calls this) write once and never see partial shards. Returns
    True when this call wrote shards."""
    if not cfg.generate_demo:
        return False
    per_class = {"train_shards": cfg.demo_train_per_class, "val_shards": cfg.demo_val_per_class}
    patterns = {"train_shards": cfg.train_shards, "val_shards": cfg.val_shards}
    keys = [key for key, pattern in patterns.items() if is_demo_pattern(key, pattern)]

    def missing() -> list[str]:
        return [key for key in keys if not all(p.exists() for p in _demo_paths(key))]

    if not missing():
        return False
    DEMO_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(DEMO_DIR.parent / f".{DEMO_DIR.name}.demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = missing()  # another run may have written them while we waited for the lock
        if todo:
            _write_demo_folder({key: per_class[key] for key in todo}, cfg.image_size, seed)
    return bool(todo)


def _write_demo_folder(per_class: dict[str, int], image_size: int, seed: int) -> None:
    """Write the demo splits of `per_class` (config key -> images per class) into DEMO_DIR."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR.name}.tmp-", dir=DEMO_DIR.parent))
    try:
        for key, count in per_class.items():
            split = key.removesuffix("_shards")
            paths = _demo_paths(key)
            write_demo_split([tmp / p.name for p in paths], count, seed, image_size, split)
        if not DEMO_DIR.exists():
            os.rename(tmp, DEMO_DIR)
        else:
            for key in per_class:
                for path in _demo_paths(key):
                    os.replace(tmp / path.name, path)
        splits = ", ".join(key.removesuffix("_shards") for key in per_class)
        log.info("wrote demo shards for %s to %s", splits, DEMO_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
