"""The baselines every run is judged against: the model as given, plain post-training
quantization, and the final weights in float, each scored by the task's primary metric `<m>`
(classification: top-1) under the report key `<baseline>_<m>`:

- `start_fp32_<m>`: the fp32 model of `model.weights` before any step (fine-tuning only).
- `ptq_int8_<m>`: post-training quantization (`qatdist.quant.ptq`) of the float weights at the
  step fake quantization turns on (step 0 when fine-tuning from `model.weights`), calibrated on
  `quant.ptq_calibration_batches` train batches split across ranks: the int8 model the user
  would have had without QAT; `ptq_fp32_<m>` is the same weights in float (when fake
  quantization starts after some fp32 training, they are less trained than the final ones).
- `fp32_<m>`: the final weights in float (fake quant and observers off, BatchNorm in eval).

A metric with more values than its primary one (segmentation: pixel accuracy, per-class IoU)
also gives `<baseline>_metric_values` for each baseline, as the report has them for int8.

Every measure is a collective over all ranks (each evaluates its share of the val shards) and
runs with the RNG states restored, so a run with baselines trains exactly as one without.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from qatdist.config import QuantConfig
from qatdist.distributed import DistEnv
from qatdist.quant import QatModel
from qatdist.quant.ptq import float_weights, post_training_int8
from qatdist.run.report import metric_key
from qatdist.tasks import Task
from qatdist.tasks.evaluate import evaluate, preserved_rng

log = logging.getLogger("qatdist")


class Baselines:
    """Measures and keeps the baseline values of one run (see the module docstring)."""

    def __init__(
        self,
        task: Task,
        quant_cfg: QuantConfig,
        env: DistEnv,
        *,
        val_batches: Callable[[], Iterable],
        calibration_batches: Callable[[int], Iterable],
        image_size: int,
        fine_tuning: bool,
    ):
        """`val_batches()`: this rank's share of the val set; `calibration_batches(n)`: n train
        batches of this rank for the PTQ calibration (other images than training's);
        `fine_tuning`: the run starts from `model.weights` (PTQ at step 0, and a start
        baseline)."""
        self.task, self.quant_cfg, self.env = task, quant_cfg, env
        self.val_batches = val_batches
        self.calibration_batches = calibration_batches
        self.image_size, self.fine_tuning = image_size, fine_tuning
        self.ptq_step = 0 if fine_tuning else quant_cfg.fake_quant_start_step
        # Report fields: `<baseline>_<m>` floats and `<baseline>_metric_values` dicts.
        self.values: dict[str, float | dict[str, float]] = {}

    def key(self, baseline: str) -> str:
        return metric_key(baseline, self.task.metric)

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, values: dict) -> None:
        self.values = dict(values)

    def _score(self, baseline: str, forward) -> float:
        """Scores `forward` over every rank's val share (collective) as `baseline`; returns
        the primary metric."""
        values = evaluate(self.task, forward, self.val_batches())
        self.values[self.key(baseline)] = values[self.task.metric]
        if len(values) > 1:
            self.values[f"{baseline}_metric_values"] = values
        return values[self.task.metric]

    def at_start(self, qat: QatModel) -> None:
        """`start_fp32_<metric>` when fine-tuning from `model.weights` (collective)."""
        if self.fine_tuning and self.key("start_fp32") not in self.values:
            with preserved_rng():
                value = self._score("start_fp32", qat.fp32_model.eval())
            log.info("baseline: fp32 model as given, %s %.4f", self.task.metric, value)

    def ptq_due(self, step: int) -> bool:
        """Whether the PTQ baseline is measured before training step `step` (0-based)."""
        wanted = self.quant_cfg.ptq_calibration_batches > 0
        return wanted and step == self.ptq_step and self.key("ptq_int8") not in self.values

    def measure_ptq(self, qat: QatModel) -> float:
        """PTQ int8 metric of `qat`'s current float weights (collective)."""
        env = self.env
        total = self.quant_cfg.ptq_calibration_batches
        local = len(range(env.rank, total, env.world_size))  # this rank's share
        with preserved_rng():
            calibration = self.calibration_batches(local)
            int8 = post_training_int8(
                qat.fp32_model,
                float_weights(qat.state_dict(), qat.fp32_model),
                (batch.images for batch in calibration) if local else [],
                self.quant_cfg,
                image_size=self.image_size,
                dynamic_spatial=qat.dynamic_spatial,
            )
            value = self._score("ptq_int8", int8)
        # The float model PTQ started from: its metric is what PTQ's own drop is measured against.
        with qat.evaluating(fake_quant=False) as model:
            self._score("ptq_fp32", model)
        log.info(
            "baseline at step %d: float %s %.4f, post-training int8 (%d calibration batches) %.4f",
            self.ptq_step,
            self.task.metric,
            self.values[self.key("ptq_fp32")],
            total,
            value,
        )
        return value

    def at_end(self, qat: QatModel, step: int) -> dict:
        """`fp32_<metric>` of the final weights, and the PTQ baseline if the run ended before
        fake quantization turned on (collective). Returns every baseline measured."""
        if step <= self.ptq_step and self.ptq_due(self.ptq_step):
            self.measure_ptq(qat)
        with qat.evaluating(fake_quant=False) as model:
            self._score("fp32", model)
        return dict(self.values)
