"""Segmentation samples in shards: an image and its label map (`<key>.seg.png`, one class index
per pixel, stored losslessly), read back with errors that name shard and key, and written from a
folder of images beside a folder of label maps paired by file stem (`scripts/make_shards.py`).

Everything is checked before anything is written: an image without its label map or the
reverse, an unreadable file, a label map whose size differs from its image's, or a label value
that is neither a class (0..num_classes-1) nor the ignore index is a ShardError naming the file.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qatdist.data.shards import (
    IMAGE_EXTENSIONS,
    DataError,
    RawSample,
    ShardError,
    shard_pattern,
    write_samples,
)

LABEL_MAP_EXTENSION = "seg.png"
# Single-channel modes a label map can be read from; palette ("P") PNGs hold the indices.
_INDEX_MODES = ("L", "P", "I", "I;16")
_SHOWN = 5


def read_label_map(data: bytes) -> np.ndarray:
    """The (H, W) uint8 class indices of an encoded label map. ValueError saying why when the
    bytes are not an image or not a single-channel map with values 0..255."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except UnidentifiedImageError:
        raise ValueError("unknown image format") from None
    except Exception as e:  # PIL raises many types for bad bytes; all mean "undecodable"
        raise ValueError(str(e)) from None
    if mode not in _INDEX_MODES or array.ndim != 2:
        raise ValueError(
            f"a label map holds one class index per pixel (a single-channel image), "
            f"got mode {mode} (colour-coded maps must be converted to indices first)"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"label values {array.min()}..{array.max()} do not fit in 0..255")
    return array.astype(np.uint8)


def bad_label_values(labels: np.ndarray, num_classes: int, ignore_index: int) -> list[int]:
    """The distinct values of `labels` that are neither a class nor `ignore_index`."""
    values = np.unique(labels)
    return [int(v) for v in values if not (v < num_classes or v == ignore_index)]


def describe_bad_values(bad: list[int], num_classes: int, ignore_index: int) -> str:
    shown = ", ".join(map(str, bad[:_SHOWN])) + (", ..." if len(bad) > _SHOWN else "")
    return (
        f"label value(s) {shown} are neither a class (0..{num_classes - 1}) nor the ignore "
        f"index ({ignore_index})"
    )


def decode_segmentation_sample(
    raw: RawSample, num_classes: int, ignore_index: int
) -> tuple[Image.Image, np.ndarray]:
    """(RGB image, (H, W) uint8 label map) of a shard sample; DataError naming shard and key
    when a member is missing or undecodable, the sizes differ or a label value is invalid."""
    where = f"shard {raw.shard}, sample key {raw.key!r}"
    if raw.error is not None:
        raise DataError(raw.error)
    image_ext = next(
        (
            e
            for e in raw.files
            if e != LABEL_MAP_EXTENSION and e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
        ),
        None,
    )
    if image_ext is None:
        raise DataError(f"{where}: no image member (members: {sorted(raw.files)})")
    if LABEL_MAP_EXTENSION not in raw.files:
        raise DataError(f"{where}: missing label map (.{LABEL_MAP_EXTENSION} member)")
    try:
        img = Image.open(io.BytesIO(raw.files[image_ext])).convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes; all mean "undecodable"
        reason = "unknown image format" if isinstance(e, UnidentifiedImageError) else e
        raise DataError(f"{where}: cannot decode .{image_ext} image: {reason}") from None
    try:
        labels = read_label_map(raw.files[LABEL_MAP_EXTENSION])
    except ValueError as e:
        raise DataError(f"{where}: cannot read .{LABEL_MAP_EXTENSION} label map: {e}") from None
    if labels.shape != (img.height, img.width):
        raise DataError(
            f"{where}: label map is {labels.shape[1]}x{labels.shape[0]}, image is "
            f"{img.width}x{img.height} (width x height)"
        )
    if bad := bad_label_values(labels, num_classes, ignore_index):
        raise DataError(f"{where}: {describe_bad_values(bad, num_classes, ignore_index)}")
    return img, labels


@dataclass
class SegmentationShardSummary:
    """What `make_segmentation_shards` wrote."""

    pattern: str
    count: int
    ignored_files: list[str]


def _files_by_stem(folder: Path, what: str, ignored: list[str]) -> dict[str, Path]:
    """The image files directly in `folder` by stem; ShardError when two share a stem."""
    if not folder.is_dir():
        raise ShardError(f"{what} folder not found: {folder}")
    known = {ext.lower() for ext in Image.registered_extensions()}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in known:
            ignored.append(str(path))
            continue
        if path.stem in found:
            raise ShardError(
                f"two {what} files with the stem {path.stem!r}: {found[path.stem]} and {path}"
            )
        found[path.stem] = path
    return found


def _checked_pair(
    image_path: Path, label_path: Path, num_classes: int, ignore_index: int
) -> dict[str, bytes]:
    """The shard members of one pair (the image's original bytes, or PNG when the reader does
    not know its extension; the label map re-encoded as 8-bit PNG), or ShardError naming the
    file at fault."""
    data = image_path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
            ext = image_path.suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTENSIONS:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        raise ShardError(f"unreadable image {image_path}: {e}") from None
    try:
        labels = read_label_map(label_path.read_bytes())
    except ValueError as e:
        raise ShardError(f"unreadable label map {label_path}: {e}") from None
    if labels.shape != (size[1], size[0]):
        raise ShardError(
            f"label map {label_path} is {labels.shape[1]}x{labels.shape[0]} but its image "
            f"{image_path} is {size[0]}x{size[1]} (width x height)"
        )
    if bad := bad_label_values(labels, num_classes, ignore_index):
        raise ShardError(
            f"label map {label_path}: {describe_bad_values(bad, num_classes, ignore_index)}"
        )
    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, format="PNG")
    return {ext: data, LABEL_MAP_EXTENSION: buf.getvalue()}


def make_segmentation_shards(
    images_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str,
    num_classes: int,
    ignore_index: int,
    shard_size: int = 500,
    shuffle: bool = False,
    seed: int = 0,
) -> SegmentationShardSummary:
    """Write `<split>-NNNNNN.tar` shards of (image, label map) pairs from `images_dir` and
    `labels_dir`, paired by file stem. Every pair is read and checked first; ShardError naming
    the file (and nothing written) for an image without a label map or the reverse, an
    unreadable file, sizes that differ or a label value that is neither a class nor
    `ignore_index`. Keys are `<split><index:06d>_<stem>`; `shuffle` orders the pairs by `seed`
    (training shards then mix frames), else in sorted stem order."""
    if shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    if num_classes < 1 or not 0 <= ignore_index <= 255:
        raise ShardError(
            f"need num_classes >= 1 and an ignore index in 0..255, got {num_classes}, "
            f"{ignore_index}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ShardError(f"split name {split!r}: use letters, digits, '_' or '-'")
    ignored: list[str] = []
    images = _files_by_stem(Path(images_dir), "image", ignored)
    labels = _files_by_stem(Path(labels_dir), "label map", ignored)
    if not images:
        raise ShardError(f"no images in {images_dir}")
    for stem, path in images.items():
        if stem not in labels:
            raise ShardError(f"image {path} has no label map with its stem in {labels_dir}")
    for stem, path in labels.items():
        if stem not in images:
            raise ShardError(f"label map {path} has no image with its stem in {images_dir}")
    stems = sorted(images)
    if shuffle:
        random.Random(seed).shuffle(stems)
    samples = [
        (
            f"{split}{index:06d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)}",
            _checked_pair(images[stem], labels[stem], num_classes, ignore_index),
        )
        for index, stem in enumerate(stems)
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = -(-len(samples) // shard_size)
    write_samples([out / f"{split}-{i:06d}.tar" for i in range(count)], samples, len(samples))
    return SegmentationShardSummary(shard_pattern(out, split, count), len(samples), ignored)
