"""Accuracy budget: keep the quantized layers that hurt most in fp32 until the int8 model's score
(the task's primary metric, e.g. top-1) is within `quant.max_accuracy_drop` of fp32.

`meet_accuracy_budget` is the one entry point. It runs on every rank (collective) after QAT:
1. fp32 and int8 score of the trained model; done if the drop is within the budget.
2. Rank 0 measures each quantized layer's SQNR (the error the layer itself adds in the int8
   model against float, `layer_error.layer_sqnr_db`) and broadcasts the table; the
   `quant.sensitivity_candidates` lowest-SQNR layers are candidates.
3. Candidates are split round-robin over the ranks. A rank evaluates each of its candidates on
   the FULL validation set (rebuild with the layer in fp32, convert, score) and measures its
   latency cost; the results are all-gathered. Full-set evaluation (instead of each rank's
   shard with counts all-reduced per candidate) keeps the ranks independent: no collective per
   candidate, a rank never waits on another's candidate, and every gain is measured on the same
   samples, so gains are comparable. Each number is measured by exactly one rank and gathered,
   so every rank holds the same table and takes the same decisions.
4. Greedy: layers go to fp32 by gain (cheaper first when gains tie within `gain_tolerance`),
   one at a time, with optional fine-tuning after each change, each resulting model evaluated
   (rank 0, broadcast), until the budget is met or the candidates run out. The best model
   found is returned either way.

A layer moved to fp32 keeps the observer ranges of the layers after it, as QAT left them: if
they were learned behind a broken layer they stay too narrow until fine-tuning
(`quant.fallback_finetune_steps`) updates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from qatdist.config import QuantConfig
from qatdist.distributed import all_gather_object, broadcast_object
from qatdist.quant.convert import compile_for_inference, convert_to_int8
from qatdist.quant.layer_error import Rebuild, float_twin, layer_sqnr_db
from qatdist.tasks.base import Task
from qatdist.tasks.evaluate import accumulate, side_by_side_latency_ms

# the score of a model (its forward) on the full validation set: the task's primary metric,
# negated when lower is better, so that higher is always better here
Evaluate = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]
# ms added by the candidate: (candidate int8 model, all-int8 model of the same weights)
LatencyCost = Callable[[torch.fx.GraphModule, torch.fx.GraphModule], float]
# `steps` QAT optimizer steps on the given prepared model, in place (collective if distributed)
Finetune = Callable[[torch.fx.GraphModule, int], None]


@dataclass
class SensitivityRow:
    layer: str
    sqnr_db: float
    gain_when_float: float | None = None  # score gain; None: not among the measured candidates
    latency_cost_ms: float | None = None


@dataclass
class BudgetResult:
    accuracy_budget: float  # largest accepted fp32 score - int8 score
    accuracy_budget_met: bool
    fp32_fallback_layers: list[str]  # layers kept in fp32 by the search (beyond the config's)
    sensitivity: list[SensitivityRow]  # every quantized layer, lowest SQNR first
    int8_score: float  # of the returned model
    fp32_score: float
    candidates_evaluated_per_rank: list[int]
    initial_int8_score: float  # before any layer went to fp32
    model: torch.fx.GraphModule = field(repr=False)  # the best prepared model found

    def to_report(self, metric: str) -> dict:
        """The report.json entries of the search (the model and the scores, which the caller
        reports in its own terms, are not among them); a sensitivity row's gain is named
        `<metric>_gain_when_float`."""
        sensitivity = [
            {
                "layer": row.layer,
                "sqnr_db": row.sqnr_db,
                f"{metric}_gain_when_float": row.gain_when_float,
                "latency_cost_ms": row.latency_cost_ms,
            }
            for row in self.sensitivity
        ]
        return {
            "accuracy_budget": self.accuracy_budget,
            "accuracy_budget_met": self.accuracy_budget_met,
            "fp32_fallback_layers": list(self.fp32_fallback_layers),
            "sensitivity": sensitivity,
            "candidates_evaluated_per_rank": list(self.candidates_evaluated_per_rank),
        }


def full_val_score(
    task: Task, val_batches: Callable[[], Iterable], pad_to: int | None = None
) -> Evaluate:
    """An `Evaluate` over the whole validation set: `val_batches()` yields (inputs, target, ...)
    batches of every sample, whichever rank calls it (e.g. `data.val_batches(..., rank=0,
    world_size=1)`); the score is the task's primary metric, negated when lower is better."""
    sign = 1.0 if task.higher_is_better else -1.0

    def evaluate(forward: Callable[[torch.Tensor], torch.Tensor]) -> float:
        metric = accumulate(task, forward, val_batches(), pad_to=pad_to)
        if not metric.totals.any():
            raise ValueError("accuracy budget: the validation batches hold no samples")
        return sign * metric.compute()[task.metric]

    return evaluate


class CompiledLatencyCost:
    """`LatencyCost` measured on this CPU: candidate and all-int8 model compiled with Inductor
    (freezing) and timed side by side on `example` (median of `iters`). The all-int8 model is
    compiled once per object it is given."""

    def __init__(self, example: torch.Tensor, iters: int = 20):
        self.example, self.iters = example, iters
        self._baseline: tuple[torch.fx.GraphModule, Callable] | None = None

    def __call__(self, candidate: torch.fx.GraphModule, baseline: torch.fx.GraphModule) -> float:
        if self._baseline is None or self._baseline[0] is not baseline:
            self._baseline = (baseline, compile_for_inference(baseline))
        models = {"baseline": self._baseline[1], "candidate": compile_for_inference(candidate)}
        ms = side_by_side_latency_ms(models, self.example, iters=self.iters)
        return ms["candidate"] - ms["baseline"]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1  # no process group: one rank, the same code path


def _all_gather(obj) -> list:
    if _rank_and_world()[1] == 1:
        return [obj]
    return all_gather_object(obj)


def _broadcast(obj, src: int = 0):
    if _rank_and_world()[1] == 1:
        return obj
    return broadcast_object(obj, src=src)


def _within(fp32_score: float, int8_score: float, budget: float) -> bool:
    # scores are often ratios of counts: a drop equal to the budget must not fail on rounding
    return fp32_score - int8_score <= budget + 1e-9


def greedy_order(rows: list[SensitivityRow], gain_tolerance: float) -> list[SensitivityRow]:
    """Measured candidates by score gain, highest first; gains within `gain_tolerance` of the
    group's best count as tied and go cheapest (latency cost) first."""
    measured = sorted(
        (r for r in rows if r.gain_when_float is not None),
        key=lambda r: -r.gain_when_float,
    )
    ordered = []
    while measured:
        top = measured[0].gain_when_float
        tied = [r for r in measured if top - r.gain_when_float <= gain_tolerance]
        measured = [r for r in measured if r not in tied]
        ordered += sorted(tied, key=lambda r: r.latency_cost_ms or 0.0)
    return ordered


def _measure_candidates(
    prepared, rows, quant_cfg, *, rebuild, evaluate, int8_score, baseline_int8, latency_cost
) -> list[int]:
    """Measure the `quant_cfg.sensitivity_candidates` first `rows` (score gain in fp32, latency
    cost), split round-robin over the ranks and all-gathered into `rows` on every rank.
    Returns how many candidates each rank evaluated."""
    rank, world = _rank_and_world()
    base_names = list(quant_cfg.fp32_module_names)
    candidates = [row.layer for row in rows[: quant_cfg.sensitivity_candidates]]
    mine = {}
    for layer in candidates[rank::world]:
        int8 = convert_to_int8(rebuild(prepared, [*base_names, layer]))
        gain = evaluate(int8) - int8_score
        cost = latency_cost(int8, baseline_int8) if latency_cost is not None else None
        mine[layer] = (gain, cost)
    gathered = _all_gather(mine)
    for part in gathered:
        for row in rows:
            if row.layer in part:
                row.gain_when_float, row.latency_cost_ms = part[row.layer]
    return [len(part) for part in gathered]


def _greedy_fallback(
    prepared, rows, quant_cfg, *, rebuild, evaluate, finetune, int8_score, fp32_score, tolerance
) -> tuple[float, list[str], torch.fx.GraphModule]:
    """Layers to fp32 one at a time in greedy order until the budget is met: (score, layers,
    prepared model) of the best model found. Layers whose own gain was clearly negative are
    skipped; zero gains are tried (two broken layers each gain nothing alone)."""
    budget, base_names = quant_cfg.max_accuracy_drop, list(quant_cfg.fp32_module_names)
    rank = _rank_and_world()[0]
    finetuning = finetune is not None and quant_cfg.fallback_finetune_steps > 0
    best = (int8_score, [], prepared)
    current, chosen = prepared, []
    for row in greedy_order(rows, tolerance):
        if row.gain_when_float < -tolerance:
            continue
        chosen = [*chosen, row.layer]
        current = rebuild(current, [*base_names, *chosen])
        if finetuning:
            finetune(current, quant_cfg.fallback_finetune_steps)
        if len(chosen) == 1 and not finetuning:
            score = int8_score + row.gain_when_float  # this very model was measured
        else:
            score = _broadcast(evaluate(convert_to_int8(current)) if rank == 0 else None)
        if score > best[0]:
            best = (score, chosen, current)
        if _within(fp32_score, score, budget):
            break
    return best


def meet_accuracy_budget(
    prepared: torch.fx.GraphModule,
    quant_cfg: QuantConfig,
    *,
    rebuild: Rebuild,
    evaluate: Evaluate,
    calibration_batches: list[torch.Tensor],
    fp32_score: float | None = None,
    latency_cost: LatencyCost | None = None,
    finetune: Finetune | None = None,
    gain_tolerance: float = 0.002,
) -> BudgetResult:
    """Keep layers of the trained `prepared` model in fp32 until `fp32_score - int8_score <=
    quant_cfg.max_accuracy_drop` (see the module docstring). Collective: every rank calls it
    with identical models (synced statistics) and gets the same result.

    `rebuild(source, fp32_module_names)` returns a new prepared model with those layers in
    fp32 and `source`'s weights and statistics (`layer_error.make_rebuilder`); `evaluate`
    returns the full-validation-set score of a forward (`full_val_score`);
    `calibration_batches` are input images for the SQNR table; `fp32_score` is measured on the
    float twin when not given; `latency_cost` (e.g. `CompiledLatencyCost`) is skipped when None;
    `finetune(model, quant_cfg.fallback_finetune_steps)` runs after each layer goes to fp32.
    `prepared` itself is not changed.
    """
    budget = quant_cfg.max_accuracy_drop
    if budget < 0:
        raise ValueError(f"quant.max_accuracy_drop={budget}: the accuracy budget is off")
    rank, world = _rank_and_world()
    baseline_int8 = convert_to_int8(prepared)
    # One rank measures each number and broadcasts it: ranks on different CPUs round int8
    # differently, and a decision taken from different numbers would split the ranks.
    fp32_src = 1 % world
    if fp32_score is None:
        fp32_score = evaluate(float_twin(prepared)) if rank == fp32_src else None
        fp32_score = _broadcast(fp32_score, src=fp32_src)
    int8_score = _broadcast(evaluate(baseline_int8) if rank == 0 else None)
    sqnr = _broadcast(
        layer_sqnr_db(prepared, calibration_batches, int8=baseline_int8) if rank == 0 else None
    )
    rows = [SensitivityRow(layer, db) for layer, db in sorted(sqnr.items(), key=lambda kv: kv[1])]
    score, chosen, model, per_rank = int8_score, [], prepared, [0] * world
    if not _within(fp32_score, int8_score, budget):
        per_rank = _measure_candidates(
            prepared,
            rows,
            quant_cfg,
            rebuild=rebuild,
            evaluate=evaluate,
            int8_score=int8_score,
            baseline_int8=baseline_int8,
            latency_cost=latency_cost,
        )
        score, chosen, model = _greedy_fallback(
            prepared,
            rows,
            quant_cfg,
            rebuild=rebuild,
            evaluate=evaluate,
            finetune=finetune,
            int8_score=int8_score,
            fp32_score=fp32_score,
            tolerance=gain_tolerance,
        )
    return BudgetResult(
        accuracy_budget=budget,
        accuracy_budget_met=_within(fp32_score, score, budget),
        fp32_fallback_layers=chosen,
        sensitivity=rows,
        int8_score=score,
        fp32_score=fp32_score,
        candidates_evaluated_per_rank=per_rank,
        initial_int8_score=int8_score,
        model=model,
    )
