"""Top-1 evaluation and latency measurement."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from qatdist.distributed import all_reduce_sum


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


def count_correct(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable,
    pad_to: int | None = None,
) -> tuple[int, int]:
    """(correct, seen) of `forward` over `batches` of (images, labels, ...).

    With `pad_to`, short batches are zero-padded to that size (and the padding ignored), so a
    model compiled for one static batch size is never recompiled.
    """
    correct = seen = 0
    with torch.no_grad():
        for batch in batches:
            images, labels = batch[0], batch[1]
            n = images.shape[0]
            if n == 0:
                continue
            if pad_to is not None:
                images = pad_batch(images, pad_to)
            logits = forward(images)[:n]
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += n
    return correct, seen


def distributed_top1(local_correct: int, local_seen: int) -> float:
    """Top-1 over all ranks' (correct, seen) counts."""
    correct, seen = all_reduce_sum([local_correct, local_seen])
    return correct / seen if seen else 0.0


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
