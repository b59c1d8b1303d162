"""Evaluation through a task's metric (one rank, or summed over every rank with one
collective) and latency measurement."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from qatdist.distributed import all_reduce_sum
from qatdist.tasks.base import Metric, Outputs, Target, Task


@contextlib.contextmanager
def preserved_rng():
    """Restore torch, numpy and python RNG states on exit: evaluation must not change what a
    training run does next (a DataLoader draws its base seed from the torch RNG)."""
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """`images` zero-padded to `size` samples (a model compiled for one static batch size is
    then never recompiled); callers drop the padded outputs."""
    if images.shape[0] >= size:
        return images
    return torch.cat([images, images.new_zeros((size - images.shape[0], *images.shape[1:]))])


def first(outputs: Outputs, n: int) -> Outputs:
    """The first `n` samples of `outputs` (a tensor, or a dict of tensors such as `{"out",
    "aux"}`): drops the padding `pad_batch` added."""
    if isinstance(outputs, dict):
        return {key: first(value, n) for key, value in outputs.items()}
    return outputs[:n]


def outputs_over(
    forwards: dict[str, Callable[[torch.Tensor], Outputs]],
    batches: Iterable,
    pad_to: int | None = None,
) -> Iterator[tuple[torch.Tensor, Target, dict[str, Outputs]]]:
    """For each non-empty batch of (images, target, ...) in `batches`: the images, the target
    and each forward's outputs on the images (without autograd). The one evaluation loop.

    With `pad_to`, short batches are zero-padded to that size (the padding's outputs dropped),
    so a model compiled for one static batch size is never recompiled.
    """
    for batch in batches:
        images, target = batch[0], batch[1]
        n = images.shape[0]
        if n == 0:
            continue
        inputs = images if pad_to is None else pad_batch(images, pad_to)
        with torch.no_grad():
            outputs = {name: first(forward(inputs), n) for name, forward in forwards.items()}
        yield images, target, outputs


def accumulate(
    task: Task,
    forward: Callable[[torch.Tensor], Outputs],
    batches: Iterable,
    pad_to: int | None = None,
) -> Metric:
    """`task`'s metric of `forward` over `batches` of (inputs, target, ...), on this rank only
    (`pad_to`: see `outputs_over`)."""
    metric = task.new_metric()
    for _, target, outputs in outputs_over({"model": forward}, batches, pad_to):
        metric.update(outputs["model"], target)
    return metric


def all_ranks(metric: Metric) -> dict[str, float]:
    """`metric` summed over every rank (one all_reduce of its totals), computed: the primary
    metric first."""
    summed = torch.tensor(all_reduce_sum(metric.totals.tolist()), dtype=torch.float64)
    metric.totals = summed
    return metric.compute()


def evaluate(
    task: Task, forward: Callable[[torch.Tensor], Outputs], batches: Iterable
) -> dict[str, float]:
    """The metric values of `forward` over every rank's share of `batches` (collective: every
    rank calls it with its own share); the primary metric first."""
    return all_ranks(accumulate(task, forward, batches))


def side_by_side_latency_ms(
    models: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    example: torch.Tensor,
    iters: int,
    warmup: int = 3,
) -> dict[str, float]:
    """Median latency (ms) of each model on `example`, measured interleaved in one loop so that
    machine noise hits every model alike. Warm-up iterations are excluded."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for i in range(warmup + iters):
            for name, forward in models.items():
                start = time.perf_counter()
                forward(example)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[name].append(elapsed * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}
