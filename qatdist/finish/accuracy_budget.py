"""The accuracy budget at the end of a run (`quant.max_accuracy_drop`): the trainer's and the
export's side of `qatdist.quant.accuracy.meet_accuracy_budget`.

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
from collections.abc import Callable, Iterable

import torch

from qatdist.config import OptimConfig, QuantConfig
from qatdist.distributed import DistEnv, wrap_ddp
from qatdist.optim import build_optimizer
from qatdist.quant import QatModel
from qatdist.quant import inspect as quant_inspect
from qatdist.quant.accuracy import (
    BudgetResult,
    CompiledLatencyCost,
    full_val_score,
    meet_accuracy_budget,
)
from qatdist.quant.layer_error import make_rebuilder
from qatdist.quant.sync import sync_quant_stats
from qatdist.step import train_step
from qatdist.tasks import Task
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
    rebuild = make_rebuilder(
        _rebuildable_fp32(qat),
        example,
        qat.quant_cfg,
        phase=qat.phase,
        dynamic_spatial=qat.dynamic_spatial,
    )
    rebuilt = _qat_model(qat, rebuild(qat.prepared, names), names)
    rebuilt.dynamic_spatial = qat.dynamic_spatial
    return rebuilt


def _log_outcome(result: BudgetResult, metric: str) -> None:
    drop = result.fp32_score - result.int8_score
    layers = result.fp32_fallback_layers or "no layer"
    if result.accuracy_budget_met:
        log.info(
            "accuracy budget met: int8 %s drop %.4f <= %.4f with %s in fp32",
            metric,
            drop,
            result.accuracy_budget,
            layers,
        )
        return
    log.warning(
        "accuracy budget NOT met: int8 %s drop %.4f > %.4f; the best model found (%s in fp32) "
        "is saved. Raise quant.sensitivity_candidates or quant.fallback_finetune_steps, or "
        "accept a larger quant.max_accuracy_drop.",
        metric,
        drop,
        result.accuracy_budget,
        layers,
    )


class AccuracyBudget:
    """The budget search of one run (`quant.max_accuracy_drop >= 0`), see the module
    docstring."""

    def __init__(
        self,
        task: Task,
        quant_cfg: QuantConfig,
        env: DistEnv,
        *,
        val_batches: Callable[[int], Iterable],
        train_batches: Callable[[int, int], Iterable],
        optim_cfg: OptimConfig,
        peak_lr: float,
        grad_compression: str,
        image_size: int,
        batch_size: int,
        latency_iters: int,
        compiled: bool,
    ):
        """`val_batches(n)`: the whole val set in batches of n (`data.full_val_batches`);
        `train_batches(steps, seed)`: this rank's train batches for the fine-tuning after each
        layer goes to fp32, built with `optim_cfg` at the rate the run ended with relative to
        `peak_lr` (train.lr), gradients all-reduced as `grad_compression` says; `batch_size`
        and `latency_iters` size the evaluation and the latency cost (measured compiled when
        `compiled`, else not at all)."""
        self.task, self.quant_cfg, self.env = task, quant_cfg, env
        self.val_batches, self.train_batches = val_batches, train_batches
        self.optim_cfg, self.peak_lr, self.grad_compression = optim_cfg, peak_lr, grad_compression
        self.image_size, self.batch_size = image_size, batch_size
        self.latency_iters, self.compiled = latency_iters, compiled

    @property
    def enabled(self) -> bool:
        return self.quant_cfg.max_accuracy_drop >= 0

    def apply(
        self, qat: QatModel, fp32_value: float | None, *, finetune_lr: float, seed: int
    ) -> tuple[QatModel, dict]:
        """Collective: the QAT model to convert and the report fields (empty when the budget
        is off). `qat` must be synced; it is left unchanged. `fp32_value` is the run's fp32
        baseline of the task's primary metric (measured by the search when None);
        `finetune_lr` the learning rate of `quant.fallback_finetune_steps` (the run's last),
        `seed` the seed of their train batches."""
        if not self.enabled:
            return qat, {}
        bs, size, task = self.batch_size, self.image_size, self.task
        calibration = []
        for batch in self.val_batches(bs):
            calibration.append(batch.images)
            if len(calibration) == CALIBRATION_BATCHES:
                break
        example = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(0))
        latency_cost = (
            CompiledLatencyCost(example, iters=self.latency_iters) if self.compiled else None
        )
        quant_cfg = self.quant_cfg
        rebuild = make_rebuilder(
            _rebuildable_fp32(qat),
            example[:2],
            quant_cfg,
            phase=qat.phase,
            dynamic_spatial=qat.dynamic_spatial,
        )
        log.info("accuracy budget %.4f: measuring the int8 model", quant_cfg.max_accuracy_drop)
        sign = 1.0 if task.higher_is_better else -1.0
        with preserved_rng(), qat.evaluating() as prepared:
            result = meet_accuracy_budget(
                prepared,
                quant_cfg,
                rebuild=rebuild,
                evaluate=full_val_score(task, lambda: self.val_batches(bs), pad_to=bs),
                calibration_batches=calibration,
                fp32_score=None if fp32_value is None else sign * fp32_value,
                latency_cost=latency_cost,
                finetune=functools.partial(self._finetune, lr=finetune_lr, seed=seed),
            )
        # finalize measures the int8 value (compiled); the fp32 one is the baseline's
        fields = result.to_report(task.metric)
        fields["budget_candidates_per_rank"] = fields.pop("candidates_evaluated_per_rank")
        if self.env.is_rank0:  # every rank holds the same result
            _log_outcome(result, task.metric)
        if result.model is qat.prepared:
            return qat, fields
        names = [*quant_cfg.fp32_module_names, *result.fp32_fallback_layers]
        return _qat_model(qat, result.model, names), fields

    def _finetune(self, model: torch.fx.GraphModule, steps: int, *, lr: float, seed: int) -> None:
        """`steps` QAT steps of `model` on this rank's train batches (a fresh optimizer and DDP
        wrapper at the run's last learning rate), then a statistics sync. Collective."""
        ddp = wrap_ddp(model, self.grad_compression)
        optimizer = build_optimizer(model.parameters(), self.optim_cfg, lr=self.peak_lr)
        scale = lr / self.peak_lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: scale)
        # neither the training order's seed nor the PTQ calibration's
        batches = self.train_batches(steps, seed + 2)
        with preserved_rng():
            for batch in batches:
                train_step(ddp, optimizer, scheduler, self.task, batch.images, batch.target)
        sync_quant_stats(model)
