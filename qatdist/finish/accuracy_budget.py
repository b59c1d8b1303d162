"""The accuracy budget at the end of a run (`quant.max_accuracy_drop`, issue 15): the trainer's
and the export's side of `qatdist.quant.accuracy.meet_accuracy_budget`.

`AccuracyBudget.apply` runs the search on every rank after QAT and the final sync and returns
the QAT model that finalize converts (the trained one, or a rebuild with the chosen layers in
fp32) with the report fields. `with_fp32_layers` rebuilds a loaded `QatModel` with extra layers
in fp32 and the same weights and statistics: the export uses it to carry the trainer's choice
over, since the checkpoint's state belongs to the model the config builds.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import torch

from qatdist import data
from qatdist.config import Config
from qatdist.distributed import DistEnv, wrap_ddp
from qatdist.optim import build_optimizer
from qatdist.quant import QatModel
from qatdist.quant import inspect as quant_inspect
from qatdist.quant.accuracy import (
    BudgetResult,
    CompiledLatencyCost,
    full_val_top1,
    meet_accuracy_budget,
)
from qatdist.quant.layer_error import make_rebuilder
from qatdist.quant.sync import sync_quant_stats
from qatdist.step import train_step
from qatdist.tasks.evaluate import preserved_rng

log = logging.getLogger("qatdist")

CALIBRATION_BATCHES = 2  # val batches behind the per-layer SQNR table


def _rebuildable_fp32(qat: QatModel) -> torch.nn.Module:
    # A copy as QatModel.build captured it: distillation froze the original as its teacher.
    return copy.deepcopy(qat.fp32_model).train().requires_grad_(True)


def _qat_model(qat: QatModel, prepared: torch.fx.GraphModule, names: list[str]) -> QatModel:
    """`prepared` (a rebuild of `qat.prepared` with `names` in fp32) as a QatModel in `qat`'s
    phase."""
    cfg = dataclasses.replace(qat.quant_cfg, fp32_module_names=list(names))
    rebuilt = QatModel(_rebuildable_fp32(qat).eval(), prepared, cfg)
    rebuilt.set_phase(qat.phase)
    return rebuilt


def with_fp32_layers(qat: QatModel, layers: list[str], *, image_size: int) -> QatModel:
    """`qat` rebuilt with `layers` kept in fp32 beyond its config's `fp32_module_names`,
    holding `qat`'s weights and statistics, in `qat`'s phase. Raises ValueError when a layer
    is unknown or its state does not transfer."""
    # Layer names come from the quantized graph: modules, and linears called as functions
    # (`...self_attention.in_proj`, named by `qatdist.quant.fixes.attention`), which are no module.
    annotated = quant_inspect.annotated_layers(qat.prepared)
    known = {name for name, _ in qat.fp32_model.named_modules()}
    known |= {*annotated["conv"], *annotated["linear"]}
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        raise ValueError(f"fp32 fallback layers {unknown}: no such module or quantized layer")
    names = [*qat.quant_cfg.fp32_module_names, *layers]
    example = torch.randn(2, 3, image_size, image_size)
    rebuild = make_rebuilder(_rebuildable_fp32(qat), example, qat.quant_cfg, phase=qat.phase)
    return _qat_model(qat, rebuild(qat.prepared, names), names)


def _log_outcome(result: BudgetResult) -> None:
    drop = result.fp32_top1 - result.int8_top1
    layers = result.fp32_fallback_layers or "no layer"
    if result.accuracy_budget_met:
        log.info(
            "accuracy budget met: int8 drop %.4f <= %.4f with %s in fp32",
            drop,
            result.accuracy_budget,
            layers,
        )
        return
    log.warning(
        "accuracy budget NOT met: int8 drop %.4f > %.4f; the best model found (%s in fp32) is "
        "saved. Raise quant.sensitivity_candidates or quant.fallback_finetune_steps, or accept "
        "a larger quant.max_accuracy_drop.",
        drop,
        result.accuracy_budget,
        layers,
    )


class AccuracyBudget:
    """The budget search of one run (`cfg.quant.max_accuracy_drop >= 0`), see the module
    docstring."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env

    @property
    def enabled(self) -> bool:
        return self.cfg.quant.max_accuracy_drop >= 0

    def _val(self, batch_size: int):
        return data.val_batches(self.cfg.data, batch_size=batch_size, rank=0, world_size=1)

    def apply(
        self, qat: QatModel, fp32_top1: float | None, *, finetune_lr: float
    ) -> tuple[QatModel, dict]:
        """Collective: the QAT model to convert and the report fields (empty when the budget
        is off). `qat` must be synced; it is left unchanged. `fp32_top1` is the run's baseline
        (measured by the search when None); `finetune_lr` the learning rate of
        `quant.fallback_finetune_steps` (the run's last)."""
        if not self.enabled:
            return qat, {}
        cfg, bs = self.cfg, self.cfg.runtime.latency_batch_size
        size = cfg.data.image_size
        calibration = []
        for batch in self._val(bs):
            calibration.append(batch.images)
            if len(calibration) == CALIBRATION_BATCHES:
                break
        example = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(0))
        latency_cost = (
            CompiledLatencyCost(example, iters=cfg.runtime.latency_iters)
            if cfg.runtime.compile_final
            else None
        )
        rebuild = make_rebuilder(_rebuildable_fp32(qat), example[:2], cfg.quant, phase=qat.phase)
        log.info("accuracy budget %.4f: measuring the int8 model", cfg.quant.max_accuracy_drop)
        with preserved_rng(), qat.evaluating() as prepared:
            result = meet_accuracy_budget(
                prepared,
                cfg.quant,
                rebuild=rebuild,
                evaluate=full_val_top1(lambda: self._val(bs), pad_to=bs),
                calibration_batches=calibration,
                fp32_top1=fp32_top1,
                latency_cost=latency_cost,
                finetune=functools.partial(self._finetune, lr=finetune_lr),
            )
        fields = result.to_report()
        # finalize measures int8_top1 (compiled) and fp32_top1 is the baseline's
        del fields["int8_top1"], fields["fp32_top1"]
        fields["budget_candidates_per_rank"] = fields.pop("candidates_evaluated_per_rank")
        if self.env.is_rank0:  # every rank holds the same result
            _log_outcome(result)
        if result.model is qat.prepared:
            return qat, fields
        names = [*cfg.quant.fp32_module_names, *result.fp32_fallback_layers]
        return _qat_model(qat, result.model, names), fields

    def _finetune(self, model: torch.fx.GraphModule, steps: int, *, lr: float) -> None:
        """`steps` QAT steps of `model` on this rank's train batches (a fresh optimizer and DDP
        wrapper at the run's last learning rate), then a statistics sync. Collective."""
        cfg, env = self.cfg, self.env
        ddp = wrap_ddp(model, cfg.runtime.grad_compression)
        optimizer = build_optimizer(model.parameters(), cfg)
        scale = lr / cfg.train.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: scale)
        batches = data.train_batches(
            cfg.data,
            batch_size=cfg.train.batch_size,
            steps=steps,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.train.seed + 2,  # neither the training order's nor the PTQ calibration's
            epoch=0,
        )
        with preserved_rng():
            for batch in batches:
                train_step(ddp, optimizer, scheduler, batch.images, batch.labels)
        sync_quant_stats(model)
