"""Data layer: webdataset tar shards -> fixed-size, reproducible batches for every rank.

Shards are read by qatdist.data.shards (never unpickling anything); the run's task
(`qatdist.tasks.Task`) decodes each sample into (image, target), transforms the pair and
collates a batch.

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

import faulthandler
import functools
import itertools
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qatdist.config import ConfigError, DataConfig
from qatdist.config.checks import expand_shards
from qatdist.data.shards import (  # DataError is raised here and caught as data.DataError
    DataError,
    RawSample,
    count_shard,
    is_stream_url,
    read_shard,
)

if TYPE_CHECKING:
    from qatdist.tasks import Task

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    images: torch.Tensor
    """(N, 3, H, W) float32, as the task's transforms and collate made them (normalised)."""
    target: Any
    """The batch's target as the task collates it (classification: (N,) int64 labels)."""
    skipped: int
    """Bad samples skipped (data.on_error='skip') while producing this batch."""


def _shard_urls(pattern: str, key: str, allow_pipe: bool) -> list[str]:
    """Expand `pattern` for config key `key`; refuse 'pipe:' unless allowed and empty matches."""
    from braceexpand import braceexpand  # installed with webdataset

    if not pattern:
        raise ConfigError(f"data.{key}: expected a shard pattern, got ''")
    if is_stream_url(pattern):
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


def _make_batch(task: Task, inputs: list, targets: list, skipped: int) -> Batch:
    return Batch(*task.collate(inputs, targets), skipped)


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
        task: Task,
        rank_urls: list[str],
        *,
        batch_size: int,
        steps: int,
        start_step: int,
        seed: int,
        epoch: int,
        rank: int,
    ) -> None:
        self.cfg, self.task = cfg, task
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

    def _raw_samples(
        self, stream: int, errors: _SkipLog, pass_len: list[int]
    ) -> Iterator[RawSample]:
        """The stream's shards cycled forever (reshuffled after the first pass), through the
        shuffle buffer. `pass_len` receives the raw sample count of the first pass."""
        urls = self.rank_urls[stream :: self.num_streams]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{stream}")
        buffer: list[RawSample] = []
        size = self.cfg.shuffle_buffer
        for cycle in itertools.count():
            if cycle > 0:
                urls = rng.sample(urls, len(urls))
            count = 0
            for url in urls:
                for raw in read_shard(url, errors.raise_errors):
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
        cfg, task, n_streams, bs = self.cfg, self.task, self.num_streams, self.batch_size
        errors = _SkipLog(cfg.on_error)
        transform = task.train_transform()  # once per stream, i.e. per loader worker
        pass_len: list[int] = []
        samples = self._raw_samples(stream, errors, pass_len)
        # Local batch j of this stream is global step stream + j * n_streams.
        first = max(0, -(-(self.start_step - stream) // n_streams))
        end = max(0, -(-(self.steps - stream) // n_streams))
        bad_in_a_row = 0

        def next_good() -> tuple | None:
            nonlocal bad_in_a_row
            raw = next(samples)
            try:
                decoded = task.decode(raw)
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
            inputs, targets, skipped = [], [], 0
            while len(inputs) < bs:
                decoded = next_good()
                if decoded is None:
                    skipped += 1
                    continue
                rng = np.random.default_rng(
                    _seed_entropy(self.seed, self.epoch, self.rank, stream, n)
                )
                n += 1
                x, y = transform(decoded[0], decoded[1], rng)
                inputs.append(x)
                targets.append(y)
            yield _make_batch(task, inputs, targets, skipped)


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
    task: Task,
    *,
    batch_size: int,
    steps: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    worker_init_fn=None,
    stall_timeout_s: float = 0.0,
) -> Iterable[Batch]:
    """Exactly `steps - start_step` train batches of exactly `batch_size` samples (steps
    start_step .. steps-1 of the epoch) for `rank`, the same count on every rank; `task`
    decodes, transforms and collates them.

    The order is a pure function of (seed, epoch, rank, cfg): equal arguments give bitwise-equal
    batches, and `start_step=k` gives the tail of the `start_step=0` sequence. Loads in
    cfg.num_workers DataLoader workers (0: in this process); `worker_init_fn(worker_id)` is
    passed to the DataLoader. Raises ConfigError for bad patterns or too few shards, and
    DataError for a bad sample under data.on_error='raise', or when the workers deliver no batch
    for `stall_timeout_s` seconds (0: wait for ever), after printing the workers' Python stacks.
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
        task,
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
        worker_init_fn=functools.partial(_init_worker, worker_init_fn),
        timeout=stall_timeout_s,
        in_order=True,
        # Its own generator: drawing worker base seeds from the global RNG would make the
        # training RNG stream depend on when loaders are created (a resumed run creates one
        # mid-epoch); the data order is seeded explicitly above anyway.
        generator=torch.Generator().manual_seed(seed),
    )
    return _Batches(lambda: _iterate_and_stop_workers(loader, rank), steps - start_step)


# A worker asked for its stacks (a stalled loader, or `kill -USR1 <worker pid>` by hand).
_STACKS_SIGNAL = signal.SIGUSR1


def _init_worker(worker_init_fn, worker_id: int) -> None:
    faulthandler.register(_STACKS_SIGNAL, all_threads=True)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def _iterate_and_stop_workers(loader: DataLoader, rank: int) -> Iterator[Batch]:
    it = iter(loader)
    try:
        yield from it
    except RuntimeError as e:
        if not str(e).startswith("DataLoader timed out"):
            raise
        # A stuck worker would leave the other ranks waiting in a collective until they time
        # out naming nobody; this rank says it was its loader, and where the workers stand.
        pids = [w.pid for w in it._workers if w.is_alive()]
        for pid in pids:
            os.kill(pid, _STACKS_SIGNAL)
        time.sleep(1.0)  # faulthandler writes from the signal handler: give it a moment
        raise DataError(
            f"rank {rank}: the train loader's worker(s) {pids} delivered no batch for "
            f"{loader.timeout:g} s (their Python stacks are printed above)"
        ) from None
    finally:
        # After an error (or an early break) the exception's traceback keeps the iterator
        # alive, and workers stopped later by the garbage collector take seconds to join.
        it._shutdown_workers()


def _val_iter(
    cfg: DataConfig, task: Task, urls: list[str], batch_size: int, rank: int, world_size: int
) -> Iterator[Batch]:
    errors = _SkipLog(cfg.on_error)
    transform = task.eval_transform()
    inputs: list = []
    targets: list = []
    skipped = 0
    index = 0
    for url in urls:
        for raw in read_shard(url, errors.raise_errors):
            mine = index % world_size == rank
            index += 1
            if not mine:
                continue
            try:
                image, target = task.decode(raw)
            except DataError as e:
                errors.bad(e)
                skipped += 1
                continue
            x, y = transform(image, target)
            inputs.append(x)
            targets.append(y)
            if len(inputs) == batch_size:
                yield _make_batch(task, inputs, targets, skipped)
                inputs, targets, skipped = [], [], 0
    if inputs:
        yield _make_batch(task, inputs, targets, skipped)


def val_batches(
    cfg: DataConfig, task: Task, *, batch_size: int, rank: int, world_size: int
) -> Iterable[Batch]:
    """Validation batches of `task` for `rank`: sample i (in sorted shard order) goes to rank
    i % world_size, so all ranks together see every sample once. Deterministic transform;
    the last batch may be smaller and a rank may get none. Loads in this process."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}"
        )
    urls = _shard_urls(cfg.val_shards, "val_shards", cfg.allow_pipe)
    return _Reiterable(lambda: _val_iter(cfg, task, urls, batch_size, rank, world_size))


def full_val_batches(cfg: DataConfig, task: Task) -> Callable[[int], Iterable[Batch]]:
    """`f(batch_size)`: every validation sample in one process (rank 0 of 1), as the final
    measurements, the accuracy budget and the export read them. ConfigError now when the val
    pattern matches nothing."""
    _shard_urls(cfg.val_shards, "val_shards", cfg.allow_pipe)
    return lambda batch_size: val_batches(cfg, task, batch_size=batch_size, rank=0, world_size=1)


def count_samples(pattern: str, extensions: tuple[str, ...], *, allow_pipe: bool = False) -> int:
    """Number of samples (keys with an image and a member of each of `extensions`, the task's
    `sample_extensions`) in the shards matching `pattern`, from tar member names without
    decoding; a truncated or unreadable shard adds the samples before the break, with a
    warning. ConfigError when nothing matches, or for a 'pipe:' pattern unless
    `allow_pipe`."""
    return sum(count_shard(url, extensions) for url in _shard_urls(pattern, "shards", allow_pipe))
