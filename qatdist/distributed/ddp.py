"""DDP wrapping and its one communication hook.

DDP accepts a single comm hook per model ("register_comm_hook or register_builtin_comm_hook can
only be called once"), so gradient compression and all-reduce timing are composed here, in the
one hook qatdist registers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

# What runtime.grad_compression names: the all-reduce of one gradient bucket.
_ALLREDUCE = {
    "none": default_hooks.allreduce_hook,
    "bf16": default_hooks.bf16_compress_hook,
    "fp16": default_hooks.fp16_compress_hook,
}


def wrap_ddp(
    model: torch.nn.Module,
    grad_compression: str = "none",
    on_allreduce: Callable[[float, float], None] | None = None,
) -> DistributedDataParallel:
    """DDP without buffer broadcast: observer and BatchNorm statistics are synced explicitly
    (qatdist.quant.sync), since broadcasting would make them rank 0's statistics only.

    `grad_compression` 'bf16' / 'fp16' all-reduces gradients in that dtype (DDP's compress
    hooks: half the bytes; the averaged gradient is cast back to fp32), 'none' in fp32.
    `on_allreduce(start, end)` is called with each bucket's interval from launch to the
    completion of its all-reduce (`time.perf_counter()` seconds), on the backend's thread."""
    ddp = DistributedDataParallel(model, forward_sync_buffers=False, gradient_as_bucket_view=True)
    allreduce = _ALLREDUCE[grad_compression]
    if on_allreduce is not None:
        ddp.register_comm_hook(None, _timed(allreduce, on_allreduce))
    elif grad_compression != "none":
        ddp.register_comm_hook(None, allreduce)
    return ddp


def _timed(allreduce, on_allreduce: Callable[[float, float], None]):
    """`allreduce` (a DDP comm hook) reporting each bucket's interval to `on_allreduce`."""

    # No annotations: DDP checks a hook's signature by identity, and this module's are strings.
    def hook(process_group, bucket):
        start = time.perf_counter()

        def done(fut):
            on_allreduce(start, time.perf_counter())
            return fut.value()

        return allreduce(process_group, bucket).then(done)

    return hook
