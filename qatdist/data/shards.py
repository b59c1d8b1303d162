"""The webdataset shard format: reading it (for the loaders in qatdist.data) and writing it
(the demo generator and `scripts/make_shards.py`).

A sample is `<key>.<image ext>` (original image bytes) plus the members its task reads (the
classification task's `<key>.cls`, an ASCII integer label, is what the writers here produce).
The reader is our own: images are decoded with PIL and the rest by the task
(`qatdist.tasks`), so nothing in a shard is ever unpickled. Each shard is written to a hidden
temporary name and renamed, so a shard file that exists is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Extensions the reader recognises as the image member of a sample.
IMAGE_EXTENSIONS = frozenset(
    {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm"}
)
LABEL_EXTENSION = "cls"
_STREAM_PREFIXES = ("pipe:", "http://", "https://")
# webdataset's key convention: the key is the path up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class DataError(ValueError):
    """A shard or sample cannot be read; the message names the shard and the sample key."""


class ShardError(ValueError):
    """The image folder cannot be turned into shards (missing, empty, unreadable image)."""


def is_stream_url(url: str) -> bool:
    """True for 'pipe:', 'http://' and 'https://' shard URLs (read as a stream, never globbed)."""
    return url.startswith(_STREAM_PREFIXES)


@dataclass
class RawSample:
    """One undecoded sample, or (error set) a read failure at that point of a shard."""

    shard: str
    key: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    if is_stream_url(url):
        import webdataset as wds

        stream = wds.gopen(url, "rb")
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                yield tar
        finally:
            stream.close()
    else:
        with tarfile.open(url, mode="r:*") as tar:
            yield tar


def _missing_end_marker(tar: tarfile.TarFile, url: str) -> bool:
    """True when an uncompressed local shard stops without the end-of-archive block, i.e. it
    was cut at a member boundary (tarfile silently treats that as the end)."""
    if is_stream_url(url) or not isinstance(tar.fileobj, io.BufferedReader):
        return False
    size = os.fstat(tar.fileobj.fileno()).st_size
    if size < tar.offset + tarfile.BLOCKSIZE:
        return True
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE


def read_shard(url: str, raise_errors: bool) -> Iterator[RawSample]:
    """Yield the samples of one shard in order. A read failure raises DataError when
    `raise_errors`, else ends the shard with an error RawSample (one skipped sample)."""
    current: RawSample | None = None
    error = bad_key = None
    try:
        with _open_tar(url) as tar:
            for member in tar:
                match = _KEY_RE.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = RawSample(url, key)
                current.files[ext] = tar.extractfile(member).read()
            if _missing_end_marker(tar, url):
                bad_key = current.key if current is not None else None
                error = (
                    f"truncated shard {url}: no end-of-archive block after sample key {bad_key!r}"
                )
    except (tarfile.TarError, OSError, EOFError) as e:
        # The sample being read when the shard broke is the bad one.
        bad_key = current.key if current is not None else None
        current = None
        where = f"in sample key {bad_key!r}" if bad_key is not None else "before the first sample"
        error = f"truncated or unreadable shard {url} {where}: {e}"
    if current is not None:
        yield current
    if error is not None:
        if raise_errors:
            raise DataError(error)
        yield RawSample(url, bad_key, error=error)


def image_member(raw: RawSample) -> str:
    """The member name of the sample's image; DataError naming shard and key when the sample is
    a read failure or has no image."""
    if raw.error is not None:
        raise DataError(raw.error)
    image_ext = next((e for e in raw.files if e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        where = f"shard {raw.shard}, sample key {raw.key!r}"
        raise DataError(f"{where}: no image member (members: {sorted(raw.files)})")
    return image_ext


def decode_image(raw: RawSample, image_size: int) -> Image.Image:
    """The sample's image in RGB (JPEGs decoded at a reduced scale still >= `image_size`), or
    DataError naming shard and key."""
    image_ext = image_member(raw)
    try:
        img = Image.open(io.BytesIO(raw.files[image_ext]))
        img.draft("RGB", (image_size, image_size))
        img = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes; all mean "undecodable".
        # UnidentifiedImageError's message holds the BytesIO's address; keep messages stable.
        reason = "unknown image format" if isinstance(e, UnidentifiedImageError) else e
        raise DataError(
            f"shard {raw.shard}, sample key {raw.key!r}: cannot decode .{image_ext} image: {reason}"
        ) from None
    return img


def count_shard(url: str, extensions: tuple[str, ...]) -> int:
    """Samples with an image and a member of each of `extensions` (the task's
    `sample_extensions`), from member names only; a task's own member is never taken for the
    image (a label map `.seg.png` is a PNG). A shard that breaks off counts the samples before
    the break (the reader skips or raises at that point)."""
    count = 0
    key, exts = None, set()

    def complete() -> bool:
        image = any(e not in extensions and e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS for e in exts)
        return image and all(e in exts for e in extensions)

    try:
        with _open_tar(url) as tar:
            size = None
            if isinstance(tar.fileobj, io.BufferedReader) and not is_stream_url(url):
                size = os.fstat(tar.fileobj.fileno()).st_size
            for member in tar:
                match = _KEY_RE.match(member.name)
                if not member.isfile() or match is None:
                    continue
                if size is not None and member.offset_data + member.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                if match.group(1) != key:
                    count += complete()
                    key, exts = match.group(1), set()
                exts.add(match.group(2).lower())
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s is unreadable after key %r (%s); counting up to there", url, key, e)
    return count + complete()


def shard_pattern(out_dir: str | Path, prefix: str, count: int) -> str:
    """Brace pattern matching `<out_dir>/<prefix>-000000.tar` .. the `count`-th shard."""
    if count == 1:
        return str(Path(out_dir) / f"{prefix}-000000.tar")
    return str(Path(out_dir) / f"{prefix}-{{000000..{count - 1:06d}}}.tar")


def write_shards(
    paths: list[Path], samples: Iterable[tuple[bytes, str, int]], total: int, key_prefix: str
) -> None:
    """Write `total` (image bytes, image extension, label) samples spread evenly over `paths`.

    Keys are `<key_prefix><index:08d>`, unique across the shards of one call.
    """
    write_samples(
        paths,
        (
            (f"{key_prefix}{index:08d}", {ext: data, LABEL_EXTENSION: str(label).encode()})
            for index, (data, ext, label) in enumerate(samples)
        ),
        total,
    )


def write_samples(
    paths: list[Path], samples: Iterable[tuple[str, dict[str, bytes]]], total: int
) -> None:
    """Write `total` (key, {extension: bytes}) samples spread evenly over `paths`, each shard
    to a hidden temporary name renamed when complete."""
    import webdataset as wds

    it = iter(samples)
    index = 0
    for i, path in enumerate(paths):
        end = (i + 1) * total // len(paths)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with wds.TarWriter(str(tmp)) as sink:
                while index < end:
                    key, members = next(it)
                    sink.write({"__key__": key, **members})
                    index += 1
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)


@dataclass
class ShardSummary:
    """What `make_image_folder_shards` wrote."""

    train_pattern: str
    val_pattern: str
    classes: dict[str, int]
    train_count: int
    val_count: int
    ignored_files: list[str]


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path, ignored: list[str]) -> list[Path]:
    """Files under `class_dir` (recursively) with an extension PIL registers, sorted."""
    known = {ext.lower() for ext in Image.registered_extensions()}
    files = []
    for path in sorted(class_dir.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.parts[-1:]):
            continue
        if path.suffix.lower() in known:
            files.append(path)
        else:
            ignored.append(str(path))
    return files


def _load_sample(path: Path) -> tuple[bytes, str]:
    """(bytes, extension) to store for the image at `path`: the original bytes when the reader
    recognises the extension, else the image re-encoded as PNG. Raises ShardError naming the
    file when PIL cannot decode it."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            ext = path.suffix.lower().lstrip(".")
            if ext in IMAGE_EXTENSIONS:
                return data, ext
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            return buf.getvalue(), "png"
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable".
        raise ShardError(f"unreadable image {path}: {e}") from None


def _collect(root: Path, classes: dict[str, int], ignored: list[str]) -> list[tuple[Path, int]]:
    items = []
    for name, label in classes.items():
        class_dir = root / name
        if class_dir.is_dir():
            items.extend((path, label) for path in _image_files(class_dir, ignored))
    return items


def make_image_folder_shards(
    image_folder: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 500,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> ShardSummary:
    """Write train/val shards and classes.json from an ImageFolder tree.

    The tree has one sub-folder per class (sorted names -> labels 0..C-1). When it has `train/`
    and `val/` sub-trees, that split is kept; otherwise `val_fraction` of each class (at least
    one image for classes with two or more) goes to validation, chosen deterministically from
    `seed`. Train samples are shuffled across shards (so each shard mixes classes); validation
    keeps the sorted order. Raises ShardError for a missing folder, no classes, a class without
    images, or an unreadable image (naming the file).
    """
    root = Path(image_folder)
    if not root.is_dir():
        raise ShardError(f"image folder not found: {root}")
    if shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    ignored: list[str] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        names = sorted(set(_class_dirs(root / "train")) | set(_class_dirs(root / "val")))
        if not names:
            raise ShardError(f"no class sub-folders in {root / 'train'} or {root / 'val'}")
        classes = {name: i for i, name in enumerate(names)}
        train = _collect(root / "train", classes, ignored)
        val = _collect(root / "val", classes, ignored)
        for name in names:
            if not any(label == classes[name] for _, label in train + val):
                raise ShardError(f"class folder {name!r} has no images under {root}")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ShardError(f"val fraction must be in (0, 1), got {val_fraction}")
        names = _class_dirs(root)
        if not names:
            raise ShardError(f"no class sub-folders in {root}")
        classes = {name: i for i, name in enumerate(names)}
        train, val = [], []
        for name, label in classes.items():
            files = _image_files(root / name, ignored)
            if not files:
                raise ShardError(f"class folder {root / name} has no images")
            random.Random(f"{seed}/{name}").shuffle(files)
            n_val = max(1, round(len(files) * val_fraction)) if len(files) >= 2 else 0
            val.extend((path, label) for path in sorted(files[:n_val]))
            train.extend((path, label) for path in sorted(files[n_val:]))
    if not train:
        raise ShardError(f"no training images under {root}")
    if not val:
        raise ShardError(f"no validation images under {root}")
    random.Random(seed).shuffle(train)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patterns = []
    for split, items in (("train", train), ("val", val)):
        count = -(-len(items) // shard_size)
        paths = [out / f"{split}-{i:06d}.tar" for i in range(count)]
        samples = ((*_load_sample(path), label) for path, label in items)
        write_shards(paths, samples, len(items), key_prefix=split)
        patterns.append(shard_pattern(out, split, count))
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    return ShardSummary(patterns[0], patterns[1], classes, len(train), len(val), ignored)
