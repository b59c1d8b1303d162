"""Run monitoring: console progress and TensorBoard, both written by rank 0 only.

Other ranks' monitors are silent (they still log warnings and errors through `logging`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("qatdist")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks WARNING and above, each line prefixed with the rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Monitor:
    """Console progress and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.is_tty = sys.stdout.isatty()
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def progress(
        self, *, step: int, epoch: int, loss: float, images_per_s: float, step_s: float
    ) -> None:
        """One progress line: step / total, epoch, loss, images/s, ETA."""
        if not self.enabled:
            return
        eta = format_duration((self.total_steps - step) * step_s)
        line = (
            f"step {step}/{self.total_steps} epoch {epoch} loss {loss:.4f} "
            f"{images_per_s:.1f} img/s eta {eta}"
        )
        if self.is_tty:
            done = int(30 * step / max(1, self.total_steps))
            bar = "#" * done + "." * (30 - done)
            end = "\n" if step >= self.total_steps else ""
            print(f"\r[{bar}] {line}", end=end, flush=True)
        else:
            print(line, flush=True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, step)

    def info(self, message: str) -> None:
        if self.enabled:
            if self.is_tty:
                print(flush=True)
            log.info(message)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
