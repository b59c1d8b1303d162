"""Cross-rank sync of observer, fake-quant and BatchNorm statistics of a prepared QAT model.

Under DDP with `broadcast_buffers=False` every rank's observers and BatchNorm running stats see
only that rank's batches. `sync_quant_stats` makes them identical on every rank, as if one
process had seen the global batch:

- moving-average observers (`MovingAverageMinMaxObserver`, `MovingAveragePerChannelMinMaxObserver`,
  the ones the x86 QAT config inserts): `min_val` / `max_val` become the mean over ranks of the
  ranks' running values, per channel for per-channel observers (a moving average of the global
  batch's min/max; with equal momentum on every rank the mean is exact for the first batch).
- plain min/max observers (`MinMaxObserver`, `PerChannelMinMaxObserver`): min of mins, max of
  maxes.
- BatchNorm: `running_mean` = mean over ranks; `running_var` = pooled population variance over
  ranks (mean of the ranks' variances + population variance of their means);
  `num_batches_tracked` = max over ranks.
- not yet observed: an observer that has not seen data holds `min_val=+inf`, `max_val=-inf`
  (per tensor) or empty tensors (per channel). An element is taken only from the ranks where it
  is finite, so a rank that has not observed adopts the others' values; if no rank has observed,
  the element stays `+inf` / `-inf` (empty per-channel observers are resized to the other ranks'
  channel count). Nothing becomes nan.
- afterwards every fake-quant's `scale` / `zero_point` are recomputed with its observer's
  `calculate_qparams()` (resized when the shape changes), except for observers that still hold
  non-finite values, whose fake-quant keeps its qparams.

All arithmetic is float64 on all-reduced values, and the all-reduce result is identical on every
rank, so every synced buffer ends bitwise identical on every rank. Four collectives per call,
whatever the number of buffers: a MAX of the buffer sizes, a MAX of `[x, flags, -x]` over all
synced buffers (the divergence before the sync, and the min/max reductions), a SUM (means and
variances) and a MAX of `[x, flags, -x]` again (the divergence after the sync).

With world size 1 or no initialised process group there are no collectives and the statistics
are left as they are, but the qparams are still recomputed from the observers, so after
`sync_quant_stats` the qparams follow the same rule at any world size.

Unsupported stateful observers (e.g. `HistogramObserver`, PTQ only) raise `TypeError`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchao.quantization.pt2e import observer as ao_observer
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from qatdist.quant.kernels.fast_fake_quant import write_resized

_MOVING_AVERAGE = (
    ao_observer.MovingAverageMinMaxObserver,
    ao_observer.MovingAveragePerChannelMinMaxObserver,
)
_MIN_MAX = (ao_observer.MinMaxObserver, ao_observer.PerChannelMinMaxObserver)
_BN_TARGETS = (torch.ops.aten.batch_norm.default,)


@dataclass
class SyncStats:
    max_divergence_before: float  # largest |difference across ranks| of any synced buffer, before
    max_divergence_after: float  # the same after the sync (0.0 when it worked)
    seconds: float
    num_buffers: int  # buffers measured and made identical (stats, scales, zero points)
    num_collectives: int


@dataclass
class _Stat:
    """One buffer to reduce. `rule`: mean | min | max | bn_mean | bn_var | count | qparam."""

    name: str
    tensor: torch.Tensor
    rule: str
    fill: float = 0.0  # the value of "not observed" (+inf for min_val, -inf for max_val)
    partner: int = -1  # bn_var: index of its running_mean entry


@dataclass
class _Plan:
    stats: list[_Stat]
    fake_quants: list[tuple[torch.nn.Module, torch.nn.Module]]  # (fake quant, its observer)


def _observer_rule(name: str, observer: torch.nn.Module) -> str | None:
    if isinstance(observer, _MOVING_AVERAGE):  # before _MIN_MAX: they are subclasses of it
        return "mean"
    if isinstance(observer, _MIN_MAX):
        return "minmax"
    if hasattr(observer, "min_val") or hasattr(observer, "histogram"):
        raise TypeError(
            f"sync_quant_stats: cannot sync {name} ({type(observer).__name__}); only min/max "
            "and moving-average min/max observers are supported"
        )
    return None  # placeholder-like observers hold no statistics


def _bn_buffers(model: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(full name, kind, tensor) of the running stats of every batch_norm node of every graph
    module in `model` (exported graphs have no BatchNorm modules, only their buffers)."""
    found = []
    for gm_name, gm in model.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        prefix = f"{gm_name}." if gm_name else ""
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _BN_TARGETS:
                continue
            mean_node, var_node = node.args[3], node.args[4]
            if not (
                isinstance(mean_node, torch.fx.Node)
                and mean_node.op == "get_attr"
                and isinstance(var_node, torch.fx.Node)
                and var_node.op == "get_attr"
            ):
                continue  # track_running_stats=False
            module_path = mean_node.target.rpartition(".")[0]
            names = [(mean_node.target, "running_mean"), (var_node.target, "running_var")]
            counter = f"{module_path}.num_batches_tracked" if module_path else "num_batches_tracked"
            try:
                gm.get_buffer(counter)
                names.append((counter, "num_batches_tracked"))
            except AttributeError:
                pass
            for target, kind in names:
                found.append((prefix + target, kind, gm.get_buffer(target)))
    return found


def _plan(model: torch.nn.Module) -> _Plan:
    stats: list[_Stat] = []
    fake_quants = []
    seen: set[int] = set()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, ao_observer.ObserverBase) or id(module) in seen:
            continue
        seen.add(id(module))
        rule = _observer_rule(name, module)
        if rule is None:
            continue
        low, high = ("mean", "mean") if rule == "mean" else ("min", "max")
        stats.append(_Stat(f"{name}.min_val", module.min_val, low, math.inf))
        stats.append(_Stat(f"{name}.max_val", module.max_val, high, -math.inf))
    synced = {id(s.tensor) for s in stats}
    for name, module in modules.items():
        if not isinstance(module, FakeQuantizeBase):
            continue
        observer = getattr(module, "activation_post_process", None)
        if observer is None or id(getattr(observer, "min_val", None)) not in synced:
            continue
        fake_quants.append((module, observer))
        stats.append(_Stat(f"{name}.scale", module.scale, "qparam"))
        stats.append(_Stat(f"{name}.zero_point", module.zero_point, "qparam"))
    seen_tensors = {id(s.tensor) for s in stats}
    mean_index: dict[str, int] = {}
    for full_name, kind, tensor in _bn_buffers(model):
        if id(tensor) in seen_tensors:
            continue  # one BN module called twice: one set of buffers
        seen_tensors.add(id(tensor))
        module_path = full_name.rpartition(".")[0]
        if kind == "running_mean":
            mean_index[module_path] = len(stats)
            stats.append(_Stat(full_name, tensor, "bn_mean"))
        elif kind == "running_var":
            stats.append(_Stat(full_name, tensor, "bn_var", partner=mean_index[module_path]))
        else:
            stats.append(_Stat(full_name, tensor, "count"))
    return _Plan(stats, fake_quants)


def quant_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every observer, fake-quant and BatchNorm buffer of `model` by its full name.

    The tensors are the live buffers (clone them to keep a snapshot).
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, (FakeQuantizeBase, ao_observer.ObserverBase)):
            prefix = f"{name}." if name else ""
            for buffer_name, tensor in module.named_buffers():
                out.setdefault(prefix + buffer_name, tensor)
    for full_name, _, tensor in _bn_buffers(model):
        out.setdefault(full_name, tensor)
    return out


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _pack(stats: list[_Stat], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten every buffer into its slot (float64); a buffer of another size is replaced by its
    `fill` and flagged."""
    values, flags = [], []
    for stat, slot in zip(stats, slots):
        t = stat.tensor.detach()
        if t.numel() == slot:
            values.append(t.reshape(-1).to(torch.float64))
            flags.append(0.0)
        else:
            values.append(torch.full((slot,), stat.fill, dtype=torch.float64))
            flags.append(1.0)
    flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return flat, torch.tensor(flags, dtype=torch.float64)


def _max_and_min(flat: torch.Tensor, flags: torch.Tensor, group) -> tuple:
    """One MAX all-reduce: elementwise max and min over ranks, and whether any rank flagged."""
    n = flat.numel()
    buf = torch.cat([flat, flags, -flat])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    return buf[:n], buf[n + flags.numel() :].neg(), buf[n : n + flags.numel()]


def _divergence(high: torch.Tensor, low: torch.Tensor, any_flag: torch.Tensor) -> float:
    if bool((any_flag > 0).any()):
        return math.inf  # some rank holds a buffer of another shape (e.g. never observed)
    if high.numel() == 0:
        return 0.0
    # equal elements (also +inf == +inf) diverge by 0; inf - inf would be nan
    spread = torch.where(high == low, torch.zeros_like(high), high - low)
    return float(spread.max())


def _recompute_qparams(plan: _Plan) -> None:
    for fake_quant, observer in plan.fake_quants:
        lo, hi = observer.min_val, observer.max_val
        if lo.numel() == 0 or not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            continue  # not observed on any rank: keep the fake quant's qparams
        scale, zero_point = observer.calculate_qparams()
        write_resized(fake_quant.scale, scale)
        write_resized(fake_quant.zero_point, zero_point)


@torch.no_grad()
def sync_quant_stats(model: torch.nn.Module, group=None) -> SyncStats:
    """All-reduce observer and BatchNorm statistics over `group` (default: the world), then
    recompute every fake-quant's qparams. Every rank must call it; see the module docstring for
    the reductions. Returns the divergence across ranks before and after, and the cost."""
    start = time.perf_counter()
    plan = _plan(model)
    stats = plan.stats
    world = _world(group)
    if world == 1:
        _recompute_qparams(plan)
        return SyncStats(0.0, 0.0, time.perf_counter() - start, len(stats), 0)

    sizes = torch.tensor([s.tensor.numel() for s in stats], dtype=torch.int64)
    both = torch.cat([sizes, -sizes])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    slots, smallest = both[: len(stats)].tolist(), (-both[len(stats) :]).tolist()
    for stat, slot, small in zip(stats, slots, smallest):
        unobserved = small == 0 and stat.rule in ("mean", "min", "max")
        if slot != small and not (unobserved or stat.rule == "qparam"):
            raise ValueError(
                f"sync_quant_stats: {stat.name} has {small} elements on one rank and {slot} on "
                "another; the ranks hold different models"
            )

    flat, flags = _pack(stats, slots)
    high, low, any_flag = _max_and_min(flat, flags, group)
    before = _divergence(high, low, any_flag)

    offsets = [0]
    for slot in slots:
        offsets.append(offsets[-1] + slot)
    pieces, sum_at = [], {}  # SUM inputs; sum_at[i]: where entry i's pieces start in them
    total = 0
    for i, stat in enumerate(stats):
        x = flat[offsets[i] : offsets[i + 1]]
        if stat.rule == "mean":
            finite = torch.isfinite(x)
            parts = [torch.where(finite, x, torch.zeros_like(x)), finite.to(torch.float64)]
        elif stat.rule == "bn_mean":
            parts = [x]
        elif stat.rule == "bn_var":
            mean = flat[offsets[stat.partner] : offsets[stat.partner + 1]]
            parts = [x, mean * mean]
        else:
            continue
        sum_at[i] = total
        pieces.extend(parts)
        total += sum(p.numel() for p in parts)
    sums = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

    for i, stat in enumerate(stats):
        n = slots[i]
        hi, lo = high[offsets[i] : offsets[i + 1]], low[offsets[i] : offsets[i + 1]]
        s = sums[sum_at[i] :] if i in sum_at else None
        if stat.rule == "min":
            value = lo
        elif stat.rule in ("max", "count"):
            value = hi
        elif stat.rule == "mean":
            total_x, count = s[:n], s[n : 2 * n]
            fallback = lo if stat.fill > 0 else hi  # no rank observed: +inf / -inf stays
            value = torch.where(count > 0, total_x / count.clamp(min=1), fallback)
        elif stat.rule == "bn_mean":
            value = s[:n] / world
        elif stat.rule == "bn_var":
            mean_of_vars, mean_of_sq = s[:n] / world, s[n : 2 * n] / world
            mean = sums[sum_at[stat.partner] :][:n] / world
            value = mean_of_vars + (mean_of_sq - mean * mean).clamp(min=0.0)
        else:
            continue  # qparams: recomputed below
        write_resized(stat.tensor, value)
    _recompute_qparams(plan)

    flat, flags = _pack(stats, slots)
    high, low, any_flag = _max_and_min(flat, flags, group)
    after = _divergence(high, low, any_flag)
    return SyncStats(before, after, time.perf_counter() - start, len(stats), 4)
