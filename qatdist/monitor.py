"""Run monitoring: console progress and TensorBoard, both written by rank 0 only.

Other ranks' monitors write nothing (they still log warnings and errors through `logging`), but
every rank calls the same methods: `end_step` reduces the log window's numbers over ranks and
gathers each rank's CPU and memory, so it is a collective. The tag families (see
docs/monitoring.md):

- `train/`: loss and the task's primary metric of the train batches (`train/<metric>`, named
  as the task names it; both over the log window and the ranks), learning rate.
- `perf/`: global images/s, step time, the fraction of it spent waiting for data (blocked in the
  loader's `next()`), gradient all-reduce time (a DDP comm hook times each bucket's all-reduce
  from launch to the completion of its future; the union of those intervals per step, so
  buckets in flight together count once; it overlaps backward), statistics-sync time, each
  rank's CPU utilisation and resident memory (`perf/rank<r>/cpu_percent`, `.../rss_mb`), and
  the monitor's own cost (`perf/monitor_seconds`).
- `quant/`: flags (fake quant on, observers frozen, BN frozen) at each log step; per-layer
  activation scale / zero point, weight-scale mean/min/max and weight SQNR at each statistics
  sync (or every `log.quant_every_steps`); a histogram of the layers' SQNR; the layer table.
- `eval/`, `final/`: the task's metric values (every one `compute()` returns: segmentation's
  per-class IoU too) and, for a task that draws them, the first `log.val_frames` validation
  frames with the fp32 and int8 models' predictions (`<prefix>/frame<k>/<picture>` images).
- `config/`, and the hparams plugin's summary of the run.

A scalar at x = s describes the s-th optimizer step (the window ending with it); `train/lr` is
the rate after s scheduler steps, i.e. the one step s + 1 uses.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil
import torch

from qatdist.config import LogConfig
from qatdist.distributed import all_gather_object, all_reduce_sum
from qatdist.quant import inspect as quant_inspect
from qatdist.quant import schedule
from qatdist.run import report as reports
from qatdist.tasks import Metric, Task
from qatdist.tasks.base import Outputs, Target

log = logging.getLogger("qatdist")

BAR_WIDTH = 30
# Baselines of the primary metric (`<baseline>_<metric>`) and report keys written as
# `final/<key>` scalars when the report has them.
FINAL_METRIC_BASELINES = ("fp32_fake_quant", "int8", "fp32", "ptq_int8")
FINAL_SCALARS = (
    "int8_latency_ms",
    "fp32_latency_ms",
    "int8_speedup",
    "train_images_per_s",
)


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


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class AllReduceTimer:
    """Gradient all-reduce intervals, as `qatdist.distributed.wrap_ddp`'s comm hook reports
    them (`record`, called on the backend's threads). `take()` returns the union of the
    intervals recorded since the last call (seconds during which a gradient all-reduce was in
    flight) and clears them."""

    def __init__(self) -> None:
        self._intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def record(self, start: float, end: float) -> None:
        with self._lock:
            self._intervals.append((start, end))

    def take(self) -> float:
        with self._lock:
            intervals, self._intervals = self._intervals, []
        return union_seconds(intervals)


class StepRate:
    """Seconds per optimizer step for the ETA, from the recent steps that show the steady pace.

    Left out: steps flagged one-time (the first step; a QAT phase change, whose kernels compile
    once) and outliers, slower than `outlier_factor` x the lower median of the recent steps (a
    compile nobody flagged, a checkpoint). A one-time cost then does not inflate the estimate
    for every remaining step (a compile at the fake-quant switch would otherwise show an ETA
    several times the run's length).
    """

    def __init__(self, window: int = 100, outlier_factor: float = 3.0) -> None:
        self.outlier_factor = outlier_factor
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float, *, one_time: bool = False) -> None:
        if not one_time:
            self._recent.append(seconds)

    def seconds_per_step(self) -> float | None:
        """Mean of the recent steady steps; None before the first one."""
        if not self._recent:
            return None
        limit = self.outlier_factor * statistics.median_low(self._recent)
        steady = [s for s in self._recent if s <= limit]
        return sum(steady) / len(steady)


def _rank_usage(process: psutil.Process) -> dict[str, float]:
    """CPU utilisation of this process since the previous call (100 = one core busy; the
    loader's worker processes are not included) and its resident memory in MB."""
    return {
        "cpu_percent": process.cpu_percent(interval=None),
        "rss_mb": process.memory_info().rss / 2**20,
    }


class Monitor:
    """Console progress and TensorBoard; writes only where `enabled` (rank 0).

    `end_step` is a collective (every rank calls it after every optimizer step); every other
    method is local and returns at once where the monitor is disabled."""

    def __init__(
        self,
        out_dir: Path,
        cfg: LogConfig,
        task: Task,
        *,
        enabled: bool,
        total_steps: int,
        log_every_steps: int = 1,
        global_batch_size: int = 1,
        val_batches: Callable[[int], Iterable] | None = None,
    ):
        self.enabled = enabled
        self.cfg, self.task = cfg, task
        self.total_steps = total_steps
        self.log_every_steps = log_every_steps
        self.global_batch_size = global_batch_size
        self.is_tty = sys.stdout.isatty()
        self.writer = None
        if enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            from qatdist.run.folder import RunFolder

            self.writer = SummaryWriter(log_dir=str(RunFolder(out_dir).tensorboard))
        self.allreduce = AllReduceTimer()
        self._process = psutil.Process()
        self._process.cpu_percent(interval=None)  # starts the measurement interval
        self._bar_open = False  # a progress bar line waits for its newline
        self._points: list[quant_inspect.QuantPoint] | None = None
        self._quant_logged_at = -1
        self.seconds = 0.0  # the monitor's own time (reductions, summaries, writes)
        self.loop_seconds = 0.0  # all steps' time, from asking for the batch to end_step
        self.rate = StepRate()
        self._one_time_step = True  # the first step warms up (allocations, DDP buckets)
        # `val_batches(n)`: batches of n validation samples, the first one the frames shown.
        self._val_batches = val_batches
        self._frames: tuple[torch.Tensor, Target, dict[str, torch.Tensor]] | None = None
        self._frames_loaded = False
        self._frames_written: set[str] = set()  # prefixes whose frames and legend are written
        self._reset_window()

    def _reset_window(self) -> None:
        self._w_steps = 0
        self._w_loss = 0.0
        self._w_metric = self.task.new_metric()
        self._w_seconds = 0.0  # from asking the loader for a batch to the end of the step
        self._w_data_wait = 0.0
        self._w_allreduce = 0.0
        self._w_sync = 0.0
        self._step_start: float | None = None

    # --- hooks into the loop ------------------------------------------------------------

    def timed(self, batches: Iterable) -> Iterator:
        """Yield `batches`, timing how long each `next()` blocks (data wait) and starting the
        step clock; time between epochs (evaluation, checkpoints) is not counted."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._w_data_wait += time.perf_counter() - start
            self._step_start = start
            yield batch

    def end_step(
        self,
        *,
        step: int,
        epoch: int,
        loss: float,
        metric: Metric,
        lr: float,
        model: torch.nn.Module,
    ) -> None:
        """Account one finished optimizer step (`step` counts it, `metric` holds its train
        batch's metric) on every rank; at log steps
        reduce the window over ranks, gather CPU/memory, print progress and write scalars.
        Collective at log steps: every rank must call it."""
        now = time.perf_counter()
        if self._step_start is not None:
            self._w_seconds += now - self._step_start
            self.loop_seconds += now - self._step_start
            self.rate.add(now - self._step_start, one_time=self._one_time_step)
            self._step_start = None
        self._one_time_step = False
        self._w_steps += 1
        self._w_loss += loss
        self._w_metric.merge(metric)
        self._w_allreduce += self.allreduce.take()
        if self.cfg.quant_every_steps > 0 and step % self.cfg.quant_every_steps == 0:
            self.quant_summary(model, step)
        if step % self.log_every_steps and step != self.total_steps:
            return
        start = time.perf_counter()
        n = self._w_steps
        totals = self._w_metric.totals
        reduced = all_reduce_sum(
            [
                self._w_loss / n,
                self._w_data_wait,
                self._w_allreduce,
                self._w_seconds,
                1.0,
                *totals.tolist(),
            ]
        )
        loss_means, data_wait, allreduce, seconds, world = reduced[:5]
        self._w_metric.totals = torch.tensor(reduced[5:], dtype=totals.dtype)
        usage = all_gather_object(_rank_usage(self._process))
        seconds_per_rank = seconds / world
        step_s = seconds_per_rank / n if seconds_per_rank > 0 else 0.0
        images_per_s = n * self.global_batch_size / seconds_per_rank if seconds_per_rank else 0.0
        mean_loss = loss_means / world
        self.progress(
            step=step, epoch=epoch, loss=mean_loss, images_per_s=images_per_s, step_s=step_s
        )
        if self.writer is not None:
            self.scalar("train/loss", mean_loss, step)
            metric = self.task.metric
            self.scalar(f"train/{metric}", self._w_metric.compute()[metric], step)
            self.scalar("train/lr", lr, step)
            self.scalar("perf/images_per_s", images_per_s, step)
            self.scalar("perf/step_seconds", step_s, step)
            if seconds > 0:
                self.scalar("perf/data_wait_fraction", data_wait / seconds, step)
                self.scalar("perf/allreduce_fraction", allreduce / seconds, step)
            self.scalar("perf/allreduce_seconds_per_step", allreduce / world / n, step)
            if self._w_seconds > 0:
                self.scalar("perf/sync_fraction", self._w_sync / self._w_seconds, step)
            for rank, values in enumerate(usage):
                for key, value in values.items():
                    self.scalar(f"perf/rank{rank}/{key}", value, step)
            phase = schedule.current_phase(model)
            self.scalar("quant/fake_quant_on", float(phase.fake_quant_on), step)
            self.scalar("quant/observers_frozen", float(phase.observers_frozen), step)
            self.scalar("quant/bn_frozen", float(phase.bn_frozen), step)
            self.scalar("perf/monitor_seconds", self.seconds, step)
        self._reset_window()
        self.seconds += time.perf_counter() - start

    def expect_one_time_cost(self) -> None:
        """The step now starting pays a one-time cost (a QAT phase change compiles kernels):
        the ETA leaves it out."""
        self._one_time_step = True

    def on_sync(self, seconds: float, step: int, model: torch.nn.Module) -> None:
        """A statistics sync took `seconds`; with `log.quant_every_steps` 0 this is when the
        quant summaries are written (once per step however many syncs it has)."""
        if self._step_start is not None:  # inside a step (not an epoch-end or final sync)
            self._w_sync += seconds
        self.scalar("perf/sync_seconds", seconds, step)
        if self.cfg.quant_every_steps == 0:
            self.quant_summary(model, step)

    # --- quant summaries ----------------------------------------------------------------

    def quant_summary(self, model: torch.fx.GraphModule, step: int) -> None:
        """Per-layer activation qparams, weight-scale statistics and weight SQNR (rank 0)."""
        if self.writer is None or step == self._quant_logged_at:
            return
        start = time.perf_counter()
        self._quant_logged_at = step
        if self._points is None:
            self._points = quant_inspect.quant_points(model)
            self.text("quant/layers", quant_inspect.points_table(self._points), step)
        sqnrs = []
        for s in quant_inspect.summarize(model, self._points):
            layer = s.point.layer
            if s.point.kind == "activation":
                self.scalar(f"quant/act_scale/{layer}", s.scale_mean, step)
                self.scalar(f"quant/act_zero_point/{layer}", s.zero_point, step)
                continue
            self.scalar(f"quant/weight_scale_mean/{layer}", s.scale_mean, step)
            self.scalar(f"quant/weight_scale_min/{layer}", s.scale_min, step)
            self.scalar(f"quant/weight_scale_max/{layer}", s.scale_max, step)
            if s.sqnr_db is not None and math.isfinite(s.sqnr_db):
                self.scalar(f"quant/weight_sqnr_db/{layer}", s.sqnr_db, step)
                sqnrs.append(s.sqnr_db)
        if sqnrs:
            self.writer.add_histogram("quant/weight_sqnr_db", torch.tensor(sqnrs), step)
        self.seconds += time.perf_counter() - start

    # --- evaluation -----------------------------------------------------------------------

    def metric_values(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Every value of a task's metric as a `<prefix>_<key>` scalar (`eval/int8_miou`,
        `eval/int8_iou_road`, ...)."""
        for key, value in values.items():
            self.scalar(f"{prefix}_{key}", value, step)

    def _frame_set(self) -> tuple[torch.Tensor, Target, dict[str, torch.Tensor]] | None:
        """(inputs, target, the task's pictures of them) of the first `log.val_frames`
        validation frames, loaded on first use; None where no frame is shown."""
        if not self._frames_loaded:
            self._frames_loaded = True
            draws = type(self.task).frame_images is not Task.frame_images  # else: no batch read
            if draws and self.writer is not None and self.cfg.val_frames > 0 and self._val_batches:
                batch = next(iter(self._val_batches(self.cfg.val_frames)), None)
                if batch is not None:
                    inputs, target = batch[0], batch[1]
                    pictures = self.task.frame_images(inputs, target)
                    self._frames = (inputs, target, pictures) if pictures else None
        return self._frames

    @property
    def draws_frames(self) -> bool:
        """Whether `frames` writes anything: rank 0 with TensorBoard, `log.val_frames` > 0 and
        a task that draws its frames (`Task.frame_images`)."""
        return self._frame_set() is not None

    def frames(
        self, prefix: str, step: int, forwards: dict[str, Callable[[torch.Tensor], Outputs]]
    ) -> None:
        """The fixed validation frames as `<prefix>/frame<k>/<picture>` images (the task's
        pictures of them, e.g. `image` and `ground_truth`, and the task's legend as
        `<prefix>/frames_legend` text, once per prefix), and each named model's predictions on
        them as `<prefix>/frame<k>/<name>_prediction` at `step`."""
        frame_set = self._frame_set()
        if frame_set is None:
            return
        start = time.perf_counter()
        inputs, _, pictures = frame_set
        drawn = {}
        if prefix not in self._frames_written:
            self._frames_written.add(prefix)
            drawn |= pictures
            if legend := self.task.frame_legend():
                self.text(f"{prefix}/frames_legend", legend, step)
        with torch.no_grad():
            for name, forward in forwards.items():
                drawn[f"{name}_prediction"] = self.task.prediction_images(forward(inputs))
        for picture, images in drawn.items():
            for k, image in enumerate(images):
                self.writer.add_image(f"{prefix}/frame{k}/{picture}", image, step)
        self.seconds += time.perf_counter() - start

    # --- the end --------------------------------------------------------------------------

    def final(self, report: dict, hparams: dict[str, object]) -> None:
        """The baselines table and the accuracy budget's outcome on the console, the budget's
        sensitivity table as `final/sensitivity` text; final latencies, speedup and accuracies
        (and the baselines when measured) as `final/` scalars, the monitor's own time as a fraction
        of the training loop's, and the run's hyperparameters with those metrics (hparams
        plugin: `hparams`, the run's settings the trainer picks)."""
        rows = reports.baseline_rows(report)
        if self.enabled and rows:
            self._end_bar()
            width = max(len(label) for label, _ in rows)
            lines = [f"  {label:<{width}}  {value}" for label, value in rows]
            title = f"baselines ({reports.metric_label(report)} on the validation shards):"
            print("\n".join([title, *lines]), flush=True)
        if self.enabled and reports.budget_sentence(report):
            print(reports.budget_sentence(report), flush=True)
        if self.writer is None:
            return
        if reports.sensitivity_markdown(report):
            self.text("final/sensitivity", reports.sensitivity_markdown(report))
        step = reports.field(report, "steps")
        metric = reports.primary_metric(report)
        metrics = {
            f"final/{reports.metric_key(baseline, metric)}": float(value)
            for baseline in FINAL_METRIC_BASELINES
            if (value := reports.metric_field(report, baseline)) is not None
        }
        metrics |= {
            f"final/{key}": float(reports.field(report, key))
            for key in FINAL_SCALARS
            if reports.field(report, key) is not None
        }
        if self.loop_seconds > 0:
            metrics["final/monitor_overhead_fraction"] = self.seconds / self.loop_seconds
        for tag, value in metrics.items():
            self.scalar(tag, value, step)
        # The other values of the int8 model's metric (segmentation: per-class IoU), kept out
        # of the hparams summary below.
        values = reports.field(report, "int8_metric_values") or {}
        self.metric_values("final/int8", {k: v for k, v in values.items() if k != metric}, step)
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # Into this run's own event file (SummaryWriter.add_hparams would start a sub-run), so
        # the HParams dashboard pairs these values with the final/ scalars above.
        file_writer = self.writer.file_writer
        for summary in hparams_summary(hparams, metrics):
            file_writer.add_summary(summary)

    # --- plain output -------------------------------------------------------------------

    def progress(
        self, *, step: int, epoch: int, loss: float, images_per_s: float, step_s: float
    ) -> None:
        """Step / total, epoch, loss, images/s and ETA: a bar redrawn in place on a terminal,
        one line per call otherwise."""
        if not self.enabled:
            return
        rate = self.rate.seconds_per_step()
        eta = format_duration((self.total_steps - step) * (step_s if rate is None else rate))
        line = (
            f"step {step}/{self.total_steps} epoch {epoch} loss {loss:.4f} "
            f"{images_per_s:.1f} img/s eta {eta}"
        )
        if self.is_tty:
            done = min(BAR_WIDTH, BAR_WIDTH * step // max(1, self.total_steps))
            bar = "#" * done + "." * (BAR_WIDTH - done)
            # \033[K clears what a longer previous line left behind
            print(f"\r[{bar}] {line}\033[K", end="", flush=True)
            self._bar_open = True
            if step >= self.total_steps:
                self._end_bar()
        else:
            print(line, flush=True)

    def _end_bar(self) -> None:
        if self._bar_open:
            print(flush=True)
            self._bar_open = False

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, step)

    def info(self, message: str) -> None:
        if self.enabled:
            self._end_bar()  # a message on its own line, not glued to the bar
            log.info(message)

    def close(self) -> None:
        if self.enabled:
            self._end_bar()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
