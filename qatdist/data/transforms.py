"""Image transforms: decoded RGB image -> normalised (3, S, S) float32 array.

The built-in train transform is RandomResizedCrop(data.image_size, data.crop_scale, TRAIN_RATIO)
then a horizontal flip with probability data.hflip; the evaluation transform resizes the shorter
side and centre-crops. Both normalise with data.mean / data.std. `data.transform` names a factory
('package.module:function' or 'path/to/file.py:function') that replaces the train transform; its
contract is in docs/data.md:
`factory(cfg: DataConfig) -> fn(img: PIL.Image.Image, rng: numpy.random.Generator) -> ndarray`,
with `rng` (seeded per sample by the loader) the only source of randomness, so that a resumed
run stays bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from qatdist.config import ConfigError, DataConfig
from qatdist.config.factories import describe_error, load_factory

TRAIN_RATIO = (4 / 5, 5 / 4)  # RandomResizedCrop aspect-ratio range of the built-in transform

TrainTransform = Callable[[Image.Image, np.random.Generator], np.ndarray]
EvalTransform = Callable[[Image.Image], np.ndarray]


class Normalise:
    """RGB image -> (3, H, W) float32: pixels / 255, minus data.mean, divided by data.std."""

    def __init__(self, cfg: DataConfig) -> None:
        self.mean = np.array(cfg.mean, np.float32)
        self.std = np.array(cfg.std, np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        pixels = np.asarray(img, dtype=np.float32) * (1 / 255)
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)


def crop_box(
    w: int, h: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm) for a w x h image, drawn from `rng`."""
    log_ratio = (math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1]))
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(area * aspect))
        ch = round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    ratio = w / h
    if ratio < TRAIN_RATIO[0]:
        cw, ch = w, round(w / TRAIN_RATIO[0])
    elif ratio > TRAIN_RATIO[1]:
        cw, ch = round(h * TRAIN_RATIO[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def builtin_train_transform(cfg: DataConfig) -> TrainTransform:
    """The default train transform: random resized crop (data.crop_scale; [1.0, 1.0] resizes
    the whole image), flip with probability data.hflip, normalisation."""
    size, hflip, normalise = cfg.image_size, cfg.hflip, Normalise(cfg)
    scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))

    def transform(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if scale == (1.0, 1.0):
            box = (0, 0, img.width, img.height)
        else:
            box = crop_box(img.width, img.height, scale, rng)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        # Drawn whatever hflip is, so that hflip only decides, never shifts later draws.
        if rng.random() < hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalise(img)

    return transform


def eval_transform(cfg: DataConfig) -> EvalTransform:
    """Resize the shorter side to data.image_size, centre-crop a square, normalise."""
    size, normalise = cfg.image_size, Normalise(cfg)

    def transform(img: Image.Image) -> np.ndarray:
        w, h = img.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            img = img.crop((left, top, left + size, top + size))
        return normalise(img)

    return transform


def _checked(fn: TrainTransform, spec: str, size: int) -> TrainTransform:
    """`fn` with its output checked on every call: a wrong array names data.transform."""

    def transform(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        out = fn(img, rng)
        if (
            not isinstance(out, np.ndarray)
            or out.dtype != np.float32
            or out.shape != (3, size, size)
        ):
            got = (
                f"{out.dtype} array of shape {out.shape}"
                if isinstance(out, np.ndarray)
                else type(out).__name__
            )
            raise ConfigError(
                f"data.transform: {spec!r} returned a {got}; expected a float32 array of "
                f"shape (3, {size}, {size})"
            )
        return out

    return transform


def train_transform(cfg: DataConfig) -> TrainTransform:
    """The train transform data.transform names (its factory called with `cfg`), or the
    built-in one. ConfigError naming data.transform when the factory cannot be loaded, fails,
    or returns something other than a callable."""
    if not cfg.transform:
        return builtin_train_transform(cfg)
    factory = load_factory(cfg.transform, "data.transform")
    try:
        fn = factory(cfg)
    except Exception as e:  # the factory is user code: any failure is a bad setting
        raise ConfigError(
            f"data.transform: factory {cfg.transform!r} raised {describe_error(e)}"
        ) from None
    if not callable(fn):
        raise ConfigError(
            f"data.transform: factory {cfg.transform!r} returned a {type(fn).__name__}, "
            "not a function (img, rng) -> array"
        )
    return _checked(fn, cfg.transform, cfg.image_size)


def check_transform(cfg: DataConfig) -> None:
    """Build the train transform and run it twice on a probe image with equally seeded RNGs.
    ConfigError naming data.transform when it fails, returns a wrong array, or gives two
    different results (it draws randomness from somewhere other than its rng, which would
    break the bit-exact resume)."""
    fn = train_transform(cfg)
    pixels = np.random.default_rng(0).integers(0, 256, (cfg.image_size + 5, cfg.image_size + 9, 3))
    probe = Image.fromarray(pixels.astype(np.uint8), "RGB")
    outputs = []
    for _ in range(2):
        try:
            outputs.append(fn(probe.copy(), np.random.default_rng(1)))
        except ConfigError:
            raise
        except Exception as e:  # user code: any failure is a bad setting
            raise ConfigError(
                f"data.transform: {cfg.transform!r} raised {describe_error(e)} on a probe image"
            ) from None
    if not np.array_equal(outputs[0], outputs[1], equal_nan=True):
        raise ConfigError(
            f"data.transform: {cfg.transform!r} gave two different results for the same image "
            "and equally seeded rng; it must draw randomness only from the rng it is given "
            "(the bit-exact resume depends on it)"
        )
