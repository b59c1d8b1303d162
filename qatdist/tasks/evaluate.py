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


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per sample, the gap between the largest and the second-largest logit."""
    top2 = logits.float().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class DecidedAgreement:
    """Top-1 agreement of a model with a reference, judged only where the reference decided.

    Two implementations of one int8 model (reference q/dq graph, Inductor kernels, AOTI) round
    differently by vendor and CPU; where the reference's top-2 logits are closer than the
    measured logit difference, either argmax is a legitimate answer. A sample is *comparable*
    when the reference's top-2 margin exceeds the max |logit difference| measured over all the
    samples seen (the number reported beside it). Feed batches with `update`; read `result()`.
    """

    def __init__(self) -> None:
        self._margins: list[torch.Tensor] = []
        self._same: list[torch.Tensor] = []
        self.max_abs_logit_diff = 0.0

    def update(self, ref_logits: torch.Tensor, other_logits: torch.Tensor) -> None:
        if ref_logits.shape != other_logits.shape or ref_logits.dim() != 2:
            raise ValueError(
                f"logits of shape {tuple(ref_logits.shape)} and {tuple(other_logits.shape)}: "
                "expected two equal (samples, classes) shapes"
            )
        if ref_logits.shape[0] == 0:
            return
        diff = float((other_logits.float() - ref_logits.float()).abs().max())
        self.max_abs_logit_diff = max(self.max_abs_logit_diff, diff)
        self._margins.append(top2_margin(ref_logits))
        self._same.append(other_logits.argmax(dim=1) == ref_logits.argmax(dim=1))

    def result(self) -> tuple[int, int]:
        """(agreeing, comparable) sample counts."""
        if not self._margins:
            return 0, 0
        decided = torch.cat(self._margins) > self.max_abs_logit_diff
        return int((torch.cat(self._same) & decided).sum()), int(decided.sum())


def agreement_where_decided(
    ref_logits: torch.Tensor, other_logits: torch.Tensor
) -> tuple[int, int]:
    """(agreeing, comparable) samples of `other_logits` against `ref_logits`: only samples whose
    reference top-2 margin exceeds the max |logit difference| between the two are comparable
    (see `DecidedAgreement`)."""
    meter = DecidedAgreement()
    meter.update(ref_logits, other_logits)
    return meter.result()
