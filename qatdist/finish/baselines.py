"""The baselines every run is judged against: the model as given, plain post-training
quantization, and the final weights in float.

- `start_fp32_top1`: the fp32 model of `model.weights` before any step (fine-tuning only).
- `ptq_int8_top1`: post-training quantization (`qatdist.quant.ptq`) of the float weights at the
  step fake quantization turns on (step 0 when fine-tuning from `model.weights`), calibrated on
  `quant.ptq_calibration_batches` train batches split across ranks: the int8 model the user
  would have had without QAT; `ptq_fp32_top1` is the same weights in float (when fake
  quantization starts after some fp32 training, they are less trained than the final ones).
- `fp32_top1`: the final weights in float (fake quant and observers off, BatchNorm in eval).

Every measure is a collective over all ranks (each evaluates its share of the val shards) and
runs with the RNG states restored, so a run with baselines trains exactly as one without.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from qatdist import data
from qatdist.config import Config
from qatdist.distributed import DistEnv
from qatdist.quant import QatModel
from qatdist.quant.ptq import float_weights, post_training_int8
from qatdist.tasks.evaluate import count_correct, distributed_top1, preserved_rng

log = logging.getLogger("qatdist")


class Baselines:
    """Measures and keeps the baseline top-1 values of one run (see the module docstring)."""

    def __init__(self, cfg: Config, env: DistEnv, val_batches: Callable[[], Iterable]):
        self.cfg, self.env = cfg, env
        self.val_batches = val_batches  # this rank's share of the val set
        self.ptq_step = 0 if cfg.model.weights else cfg.quant.fake_quant_start_step
        self.values: dict[str, float] = {}

    def state_dict(self) -> dict[str, float]:
        return dict(self.values)

    def load_state_dict(self, values: dict[str, float]) -> None:
        self.values = dict(values)

    def at_start(self, qat: QatModel) -> None:
        """`start_fp32_top1` when fine-tuning from `model.weights` (collective)."""
        if self.cfg.model.weights and "start_fp32_top1" not in self.values:
            with preserved_rng():
                model = qat.fp32_model.eval()
                top1 = distributed_top1(*count_correct(model, self.val_batches()))
            self.values["start_fp32_top1"] = top1
            log.info("baseline: fp32 model as given, top-1 %.4f", top1)

    def ptq_due(self, step: int) -> bool:
        """Whether the PTQ baseline is measured before training step `step` (0-based)."""
        wanted = self.cfg.quant.ptq_calibration_batches > 0
        return wanted and step == self.ptq_step and "ptq_int8_top1" not in self.values

    def measure_ptq(self, qat: QatModel) -> float:
        """PTQ int8 top-1 of `qat`'s current float weights (collective)."""
        cfg, env = self.cfg, self.env
        total = cfg.quant.ptq_calibration_batches
        local = len(range(env.rank, total, env.world_size))  # this rank's share
        with preserved_rng():
            calibration = data.train_batches(
                cfg.data,
                batch_size=cfg.train.batch_size,
                steps=local,
                rank=env.rank,
                world_size=env.world_size,
                seed=cfg.train.seed + 1,  # not the training order's seed: other images
                epoch=0,
            )
            int8 = post_training_int8(
                qat.fp32_model,
                float_weights(qat.state_dict(), qat.fp32_model),
                (batch.images for batch in calibration) if local else [],
                cfg.quant,
                image_size=cfg.data.image_size,
            )
            top1 = distributed_top1(*count_correct(int8, self.val_batches()))
        # The float model PTQ started from: its top-1 is what PTQ's own drop is measured against.
        with qat.evaluating(fake_quant=False) as model:
            self.values["ptq_fp32_top1"] = distributed_top1(
                *count_correct(model, self.val_batches())
            )
        self.values["ptq_int8_top1"] = top1
        log.info(
            "baseline at step %d: float top-1 %.4f, post-training int8 (%d calibration batches) "
            "%.4f",
            self.ptq_step,
            self.values["ptq_fp32_top1"],
            total,
            top1,
        )
        return top1

    def at_end(self, qat: QatModel, step: int) -> dict[str, float]:
        """`fp32_top1` of the final weights, and the PTQ baseline if the run ended before fake
        quantization turned on (collective). Returns every baseline measured."""
        if step <= self.ptq_step and self.ptq_due(self.ptq_step):
            self.measure_ptq(qat)
        with qat.evaluating(fake_quant=False) as model:
            self.values["fp32_top1"] = distributed_top1(*count_correct(model, self.val_batches()))
        return dict(self.values)
