"""Guards against silent failure during training: non-finite loss or gradients.

Every rank checks its own loss and the gradients after DDP's all-reduce; the verdict is
all-reduced (MAX of a 0/1 flag), so every rank takes the same decision at the same step and no
rank waits in a collective that another rank skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from qatdist.quant.sync import quant_buffers

log = logging.getLogger("qatdist")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step, the loss,
    the learning rate and the last complete checkpoint."""


def _grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    # One fused pass: the norm of the per-tensor norms is non-finite iff some element is.
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms).norm()))


class NonFiniteGuard:
    """Decides after each backward whether the optimizer may step (`train.on_nonfinite`).

    `policy="stop"`: the first non-finite step raises NonFiniteError. `policy="skip"`: the
    step's update is skipped on every rank and counted, and the observer, fake-quant and
    BatchNorm statistics its forward changed are put back (`before_step` saves them: a few
    thousand numbers), so a skipped step leaves no trace; `max_consecutive` skips in a row raise.
    """

    def __init__(self, policy: str, max_consecutive: int):
        if policy not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite: expected 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_step(self, model: torch.nn.Module) -> None:
        """With `policy="skip"`, remember the statistics the coming forward will update."""
        if self.policy == "skip":
            self._saved = [(t, t.clone()) for t in quant_buffers(model).values()]

    def _restore_statistics(self) -> None:
        for live, saved in self._saved:
            if live.shape != saved.shape:  # a per-channel observer sized on first observation
                live.resize_(saved.shape)
            live.copy_(saved)

    def step_is_finite(self, loss: float, params: Iterable[torch.nn.Parameter]) -> bool:
        """True when the loss of every rank and the gradients are finite (a collective)."""
        bad = torch.tensor([0.0 if math.isfinite(loss) and _grads_finite(params) else 1.0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def should_step(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        params: Iterable[torch.nn.Parameter],
        last_checkpoint: Callable[[], object],
    ) -> bool:
        """Whether to apply this step's update; raises NonFiniteError when the run must stop.
        `last_checkpoint()` names the newest complete checkpoint (only asked on failure)."""
        if self.step_is_finite(loss, params):
            self.consecutive = 0
            return True
        where = f"last complete checkpoint: {last_checkpoint() or 'none'}"
        if self.policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step} (this rank's loss {loss}, "
                f"lr {lr:.6g}); stopping (train.on_nonfinite='stop'); {where}"
            )
        self._restore_statistics()
        self.skipped_steps += 1
        self.consecutive += 1
        log.warning(
            "non-finite loss or gradient at step %d (this rank's loss %s): update skipped "
            "(%d skipped so far, %d in a row)",
            step,
            loss,
            self.skipped_steps,
            self.consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive non-finite steps up to step {step} (this rank's "
                f"loss {loss}, lr {lr:.6g}): train.max_nonfinite_steps reached; {where}"
            )
        return False
