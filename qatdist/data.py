"""Data layer: webdataset tar shards -> fixed-size, reproducible batches for every rank.

A sample is `<key>.<image ext>` + `<key>.cls` in a tar shard. The reader is our own: images are
decoded with PIL and labels with `int(text)`, so nothing in a shard is ever unpickled.

Train order is a pure function of (seed, epoch, rank, cfg). The shard list is shuffled by
(seed, epoch); shard i goes to rank i % world_size; a rank's shards are split over
S = max(1, num_workers) streams. Stream s produces global steps s, s + S, s + 2S, ... from its
shards, cycled (and reshuffled each pass) for as long as needed, through a seeded shuffle buffer
of raw (undecoded) samples. The n-th good sample of a stream is augmented with an RNG seeded by
(seed, epoch, rank, s, n). So every rank yields exactly the requested number of batches whatever
the shard sizes, and a resumed run (start_step=k) skips the first samples of each stream without
transforming them and continues bit-for-bit where the uninterrupted run was.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import logging
import math
import os
import random
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qatdist.config import ConfigError, DataConfig, expand_shards
from qatdist.shards import IMAGE_EXTENSIONS, LABEL_EXTENSION

log = logging.getLogger(__name__)

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TRAIN_SCALE = (0.7, 1.0)  # mild: small images lose their content to harder crops
TRAIN_RATIO = (4 / 5, 5 / 4)
# Shard counts for demo patterns without a brace range (e.g. a glob).
DEMO_DEFAULT_SHARDS = {"train": 8, "val": 2}
_STREAM_PREFIXES = ("pipe:", "http://", "https://")
# webdataset's key convention: the key is the path up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class DataError(ValueError):
    """A shard or sample cannot be read; the message names the shard and the sample key."""


class Batch(NamedTuple):
    images: torch.Tensor
    """(N, 3, H, W) float32, ImageNet-normalised, contiguous."""
    labels: torch.Tensor
    """(N,) int64."""
    skipped: int
    """Bad samples skipped (data.on_error='skip') while producing this batch."""


def _is_stream_url(url: str) -> bool:
    return url.startswith(_STREAM_PREFIXES)


def _shard_urls(pattern: str, key: str, allow_pipe: bool) -> list[str]:
    """Expand `pattern` for config key `key`; refuse 'pipe:' unless allowed and empty matches."""
    from braceexpand import braceexpand  # installed with webdataset

    if not pattern:
        raise ConfigError(f"data.{key}: expected a shard pattern, got ''")
    if _is_stream_url(pattern):
        urls = list(braceexpand(pattern))
    else:
        urls = expand_shards(pattern)
    if not allow_pipe and any(u.startswith("pipe:") for u in [pattern, *urls]):
        raise ConfigError(
            f"data.{key}: {pattern!r} is a 'pipe:' URL, which runs a shell command; "
            "set data.allow_pipe=true to allow it"
        )
    if not urls:
        raise ConfigError(f"data.{key}: pattern {pattern!r} matches no shard files (0 found)")
    return urls


def _train_urls(cfg: DataConfig, world_size: int) -> list[str]:
    urls = _shard_urls(cfg.train_shards, "train_shards", cfg.allow_pipe)
    need = world_size * max(1, cfg.num_workers)
    if len(urls) < need:
        raise ConfigError(
            f"data.train_shards: {cfg.train_shards!r} matches {len(urls)} shard(s), fewer than "
            f"world_size ({world_size}) x max(1, data.num_workers) ({max(1, cfg.num_workers)}) "
            f"= {need}; every loader worker needs a shard: write more, smaller shards "
            "(scripts/make_shards.py --shard-size) or lower data.num_workers"
        )
    return urls


def check_shards(cfg: DataConfig, world_size: int) -> None:
    """Raise ConfigError (naming key, pattern and counts) when a pattern matches nothing, uses
    'pipe:' without data.allow_pipe, or has fewer train shards than world_size * workers."""
    _train_urls(cfg, world_size)
    _shard_urls(cfg.val_shards, "val_shards", cfg.allow_pipe)


@dataclass
class _Raw:
    """One undecoded sample, or (error set) a read failure at that point of a shard."""

    shard: str
    key: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    if _is_stream_url(url):
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
    if _is_stream_url(url) or not isinstance(tar.fileobj, io.BufferedReader):
        return False
    size = os.fstat(tar.fileobj.fileno()).st_size
    if size < tar.offset + tarfile.BLOCKSIZE:
        return True
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE


def _read_shard(url: str, raise_errors: bool) -> Iterator[_Raw]:
    """Yield the samples of one shard in order. A read failure raises DataError when
    `raise_errors`, else ends the shard with an error _Raw (counted as one skipped sample)."""
    current: _Raw | None = None
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
                    current = _Raw(url, key)
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
        yield _Raw(url, bad_key, error=error)


def _label_and_image_ext(raw: _Raw, num_classes: int) -> tuple[int, str]:
    where = f"shard {raw.shard}, sample key {raw.key!r}"
    if raw.error is not None:
        raise DataError(raw.error)
    image_ext = next((e for e in raw.files if e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        raise DataError(f"{where}: no image member (members: {sorted(raw.files)})")
    if LABEL_EXTENSION not in raw.files:
        raise DataError(f"{where}: missing label (.{LABEL_EXTENSION} member)")
    text = raw.files[LABEL_EXTENSION]
    try:
        label = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: label {text[:32]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside [0, {num_classes})")
    return label, image_ext


def _decode(raw: _Raw, num_classes: int, image_size: int) -> tuple[Image.Image, int]:
    """(RGB image, label) or DataError naming shard and key."""
    label, image_ext = _label_and_image_ext(raw, num_classes)
    try:
        img = Image.open(io.BytesIO(raw.files[image_ext]))
        # JPEG can decode at a reduced scale that is still >= the size we need: much faster.
        img.draft("RGB", (image_size, image_size))
        img = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes; all mean "undecodable".
        # UnidentifiedImageError's message holds the BytesIO's address; keep messages stable.
        reason = "unknown image format" if isinstance(e, UnidentifiedImageError) else e
        raise DataError(
            f"shard {raw.shard}, sample key {raw.key!r}: cannot decode .{image_ext} image: {reason}"
        ) from None
    return img, label


def _to_chw(img: Image.Image) -> np.ndarray:
    pixels = np.asarray(img, dtype=np.float32) * (1 / 255)
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def _crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (torchvision's algorithm) drawn from `rng`."""
    log_ratio = (math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1]))
    for _ in range(10):
        area = w * h * rng.uniform(*TRAIN_SCALE)
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


def train_transform(img: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop(image_size, TRAIN_SCALE, TRAIN_RATIO) + horizontal flip, normalised
    (3, S, S)."""
    box = _crop_box(img.width, img.height, rng)
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_chw(img)


def val_transform(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize(image_size) (shorter side) + CenterCrop(image_size), normalised (3, S, S)."""
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        img = img.crop((left, top, left + image_size, top + image_size))
    return _to_chw(img)


def _make_batch(images: list[np.ndarray], labels: list[int], skipped: int) -> Batch:
    return Batch(
        torch.from_numpy(np.ascontiguousarray(np.stack(images))),
        torch.tensor(labels, dtype=torch.int64),
        skipped,
    )


def _seed_entropy(*values: int) -> list[int]:
    return [v % 2**64 for v in values]


class _SkipLog:
    """Applies data.on_error to a bad sample: raise, or log once per (shard, key) and count."""

    def __init__(self, on_error: str) -> None:
        self.raise_errors = on_error == "raise"
        self._warned: set[str] = set()

    def bad(self, err: DataError) -> None:
        if self.raise_errors:
            raise err
        message = str(err)
        if message not in self._warned:
            self._warned.add(message)
            log.warning("skipping bad sample: %s", message)


class _TrainStreams(IterableDataset):
    """The batches of one rank; each DataLoader worker (or the rank itself) runs one stream."""

    def __init__(
        self,
        cfg: DataConfig,
        rank_urls: list[str],
        *,
        batch_size: int,
        steps: int,
        start_step: int,
        seed: int,
        epoch: int,
        rank: int,
    ) -> None:
        self.cfg = cfg
        self.rank_urls = rank_urls
        self.batch_size = batch_size
        self.steps = steps
        self.start_step = start_step
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.num_streams = max(1, cfg.num_workers)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        # The DataLoader asks worker k % W for the k-th batch, i.e. global step start_step + k,
        # which belongs to stream (start_step + k) % W.
        yield from self._stream((worker + self.start_step) % self.num_streams)

    def _raw_samples(self, stream: int, errors: _SkipLog, pass_len: list[int]) -> Iterator[_Raw]:
        """The stream's shards cycled forever (reshuffled after the first pass), through the
        shuffle buffer. `pass_len` receives the raw sample count of the first pass."""
        urls = self.rank_urls[stream :: self.num_streams]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{stream}")
        buffer: list[_Raw] = []
        size = self.cfg.shuffle_buffer
        for cycle in itertools.count():
            if cycle > 0:
                urls = rng.sample(urls, len(urls))
            count = 0
            for url in urls:
                for raw in _read_shard(url, errors.raise_errors):
                    count += 1
                    if len(buffer) < size:
                        buffer.append(raw)
                        continue
                    i = rng.randrange(size)
                    buffer[i], raw = raw, buffer[i]
                    yield raw
            if count == 0:
                raise DataError(f"train shards {urls} hold no samples")
            if cycle == 0:
                pass_len.append(count)

    def _stream(self, stream: int) -> Iterator[Batch]:
        cfg, n_streams, bs = self.cfg, self.num_streams, self.batch_size
        errors = _SkipLog(cfg.on_error)
        pass_len: list[int] = []
        samples = self._raw_samples(stream, errors, pass_len)
        # Local batch j of this stream is global step stream + j * n_streams.
        first = max(0, -(-(self.start_step - stream) // n_streams))
        end = max(0, -(-(self.steps - stream) // n_streams))
        bad_in_a_row = 0

        def next_good() -> tuple[Image.Image, int] | None:
            nonlocal bad_in_a_row
            raw = next(samples)
            try:
                decoded = _decode(raw, cfg.num_classes, cfg.image_size)
            except DataError as e:
                errors.bad(e)
                bad_in_a_row += 1
                if pass_len and bad_in_a_row > pass_len[0] + cfg.shuffle_buffer:
                    raise DataError(
                        f"no decodable sample in the train shards of stream {stream}: {e}"
                    ) from None
                return None
            bad_in_a_row = 0
            return decoded

        # Resume: drop the samples of earlier batches. Under 'raise' any of them that were bad
        # would have stopped the original run, so they need no decoding; under 'skip' they must
        # be decoded to know which ones the original run skipped.
        n = 0
        while n < first * bs:
            if errors.raise_errors:
                next(samples)
                n += 1
            elif next_good() is not None:
                n += 1
        for _ in range(first, end):
            images, labels, skipped = [], [], 0
            while len(images) < bs:
                decoded = next_good()
                if decoded is None:
                    skipped += 1
                    continue
                rng = np.random.default_rng(
                    _seed_entropy(self.seed, self.epoch, self.rank, stream, n)
                )
                n += 1
                images.append(train_transform(decoded[0], cfg.image_size, rng))
                labels.append(decoded[1])
            yield _make_batch(images, labels, skipped)


class _Reiterable:
    """Batches from `make_iter()`; iterating again starts over with the same batches."""

    def __init__(self, make_iter: Callable[[], Iterable[Batch]]) -> None:
        self._make_iter = make_iter

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._make_iter())


class _Batches(_Reiterable):
    """A re-iterable with a known number of batches, so len() works."""

    def __init__(self, make_iter: Callable[[], Iterable[Batch]], length: int) -> None:
        super().__init__(make_iter)
        self._length = length

    def __len__(self) -> int:
        return self._length


def train_batches(
    cfg: DataConfig,
    *,
    batch_size: int,
    steps: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    worker_init_fn=None,
) -> Iterable[Batch]:
    """Exactly `steps - start_step` train batches of exactly `batch_size` samples (steps
    start_step .. steps-1 of the epoch) for `rank`, the same count on every rank.

    The order is a pure function of (seed, epoch, rank, cfg): equal arguments give bitwise-equal
    batches, and `start_step=k` gives the tail of the `start_step=0` sequence. Loads in
    cfg.num_workers DataLoader workers (0: in this process); `worker_init_fn(worker_id)` is
    passed to the DataLoader. Raises ConfigError for bad patterns or too few shards, and
    DataError for a bad sample under data.on_error='raise'.
    """
    if batch_size < 1 or not 0 <= start_step <= steps or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1, 0 <= start_step <= steps, 0 <= rank < world_size; got "
            f"batch_size={batch_size}, start_step={start_step}, steps={steps}, "
            f"rank={rank}, world_size={world_size}"
        )
    urls = _train_urls(cfg, world_size)
    urls = random.Random(f"{seed}/{epoch}/shards").sample(urls, len(urls))
    dataset = _TrainStreams(
        cfg,
        urls[rank::world_size],
        batch_size=batch_size,
        steps=steps,
        start_step=start_step,
        seed=seed,
        epoch=epoch,
        rank=rank,
    )
    if cfg.num_workers == 0:
        return _Batches(lambda: dataset, steps - start_step)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        worker_init_fn=worker_init_fn,
        in_order=True,
        # Its own generator: drawing worker base seeds from the global RNG would make the
        # training RNG stream depend on when loaders are created (a resumed run creates one
        # mid-epoch); the data order is seeded explicitly above anyway.
        generator=torch.Generator().manual_seed(seed),
    )
    return _Batches(lambda: _iterate_and_stop_workers(loader), steps - start_step)


def _iterate_and_stop_workers(loader: DataLoader) -> Iterator[Batch]:
    it = iter(loader)
    try:
        yield from it
    finally:
        # After an error (or an early break) the exception's traceback keeps the iterator
        # alive, and workers stopped later by the garbage collector take seconds to join.
        it._shutdown_workers()


def _val_iter(
    cfg: DataConfig, urls: list[str], batch_size: int, rank: int, world_size: int
) -> Iterator[Batch]:
    errors = _SkipLog(cfg.on_error)
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped = 0
    index = 0
    for url in urls:
        for raw in _read_shard(url, errors.raise_errors):
            mine = index % world_size == rank
            index += 1
            if not mine:
                continue
            try:
                img, label = _decode(raw, cfg.num_classes, cfg.image_size)
            except DataError as e:
                errors.bad(e)
                skipped += 1
                continue
            images.append(val_transform(img, cfg.image_size))
            labels.append(label)
            if len(images) == batch_size:
                yield _make_batch(images, labels, skipped)
                images, labels, skipped = [], [], 0
    if images:
        yield _make_batch(images, labels, skipped)


def val_batches(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int) -> Iterable[Batch]:
    """Validation batches for `rank`: sample i (in sorted shard order) goes to rank
    i % world_size, so all ranks together see every sample once. Deterministic transform;
    the last batch may be smaller and a rank may get none. Loads in this process."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}"
        )
    urls = _shard_urls(cfg.val_shards, "val_shards", cfg.allow_pipe)
    return _Reiterable(lambda: _val_iter(cfg, urls, batch_size, rank, world_size))


def _count_shard(url: str) -> int:
    """Samples with an image and a label member, from member names only. A shard that breaks
    off counts the samples before the break (the reader skips or raises at that point)."""
    count = 0
    key, exts = None, set()

    def complete() -> bool:
        image = any(e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS for e in exts)
        return image and LABEL_EXTENSION in exts

    try:
        with _open_tar(url) as tar:
            size = None
            if isinstance(tar.fileobj, io.BufferedReader) and not _is_stream_url(url):
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


def count_samples(pattern: str, *, allow_pipe: bool = False) -> int:
    """Number of samples (keys with an image and a .cls member) in the shards matching
    `pattern`, from tar member names without decoding; a truncated or unreadable shard adds
    the samples before the break, with a warning. ConfigError when nothing matches, or for a
    'pipe:' pattern unless `allow_pipe`."""
    return sum(_count_shard(url) for url in _shard_urls(pattern, "shards", allow_pipe))


def _demo_paths(pattern: str, key: str, split: str) -> list[Path]:
    """The shard files a demo split must be written to so that `pattern` matches them."""
    from braceexpand import braceexpand

    if _is_stream_url(pattern):
        raise ConfigError(f"data.{key}: cannot generate demo shards at URL {pattern!r}")
    names = list(braceexpand(pattern))
    if any(ch in name for name in names for ch in "*?["):
        path = Path(names[0])
        if len(names) != 1 or "*" in str(path.parent) or "?" in pattern or "[" in pattern:
            raise ConfigError(
                f"data.{key}: cannot derive demo shard names from {pattern!r}; use a brace "
                "range like 'data/demo/train-{000000..000007}.tar'"
            )
        count = DEMO_DEFAULT_SHARDS[split]
        names = [str(path.parent / path.name.replace("*", f"{i:06d}", 1)) for i in range(count)]
    paths = [Path(name) for name in names]
    if len({p.parent for p in paths}) != 1 or len(set(paths)) != len(paths):
        raise ConfigError(
            f"data.{key}: demo shards must be distinct files in one folder, got {pattern!r}"
        )
    return paths


def ensure_demo_shards(cfg: DataConfig, seed: int) -> bool:
    """Write the built-in demo dataset where the train or val pattern matches nothing (only
    when cfg.generate_demo). The folder and the shard count come from the pattern (brace range,
    else DEMO_DEFAULT_SHARDS for a '*' glob). Shards are written to a temporary folder and
    renamed into place under a file lock, so concurrent runs write once and never see partial
    shards. Returns True when this call wrote shards."""
    from qatdist import demo

    if not cfg.generate_demo:
        return False
    splits = {
        "train": ("train_shards", cfg.train_shards, cfg.demo_train_per_class),
        "val": ("val_shards", cfg.val_shards, cfg.demo_val_per_class),
    }
    plans = {
        split: _demo_paths(pattern, key, split)
        for split, (key, pattern, _) in splits.items()
        if not expand_shards(pattern)
    }
    for split, paths in plans.items():
        key, pattern, per_class = splits[split]
        if per_class * demo.NUM_CLASSES < len(paths):
            raise ConfigError(
                f"data.{key}: {len(paths)} demo shards for {per_class * demo.NUM_CLASSES} "
                f"samples would leave shards empty; raise data.demo_{split}_per_class"
            )
    wrote = False
    for folder in sorted({paths[0].parent for paths in plans.values()}):
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock_path = folder.parent / f".{folder.name}.demo.lock"
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Another run may have written them while we waited for the lock.
            todo = [
                split
                for split, paths in plans.items()
                if paths[0].parent == folder and not expand_shards(splits[split][1])
            ]
            if todo:
                _write_demo_folder(folder, {s: plans[s] for s in todo}, splits, cfg, seed)
                wrote = True
    return wrote


def _write_demo_folder(folder, plans, splits, cfg: DataConfig, seed: int) -> None:
    from qatdist import demo

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for split, paths in plans.items():
            per_class = splits[split][2]
            tmp_paths = [tmp / p.name for p in paths]
            demo.write_demo_split(tmp_paths, per_class, seed, cfg.image_size, split)
        if not folder.exists():
            os.rename(tmp, folder)
        else:
            for paths in plans.values():
                for path in paths:
                    os.replace(tmp / path.name, path)
        log.info("wrote demo shards for %s to %s", ", ".join(plans), folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
