"""Cross-rank statistics sync with 2 real gloo processes, each feeding different data.

One spawn runs every scenario (start-up and capture dominate the cost); the workers save their
buffers before and after each sync to tmp_path and the tests compare them here.
"""

import copy
import dataclasses
import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FakeQuantizeBase
from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

from qatdist.config import QuantConfig
from qatdist.quant import QatModel
from qatdist.quant.sync import SyncStats, quant_buffers, sync_quant_stats

WORLD = 2


class TinyNet(nn.Module):
    """Conv-BN-ReLU blocks, pool, Linear; `blocks` sets the number of buffers."""

    def __init__(self, blocks: int = 2):
        super().__init__()
        layers = []
        for i in range(blocks):
            layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MinMaxHolder(nn.Module):
    """Fake quants with plain (not moving-average) min/max observers, per tensor and per
    channel: the prepared x86 QAT model has none, the sync must still handle them."""

    def __init__(self):
        super().__init__()
        self.act = FakeQuantize(observer=MinMaxObserver, quant_min=0, quant_max=255)
        self.weight = FakeQuantize(
            observer=PerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )

    def forward(self, x):
        return self.act(x), self.weight(x.flatten(1))


def _prepared(blocks: int = 2) -> torch.fx.GraphModule:
    torch.manual_seed(0)  # identical weights on every rank
    return QatModel.from_fp32(TinyNet(blocks), QuantConfig(), image_size=16).prepared


def _rank_batches(rank: int, n: int = 3) -> list[torch.Tensor]:
    """Rank-dependent data: a different stream, spread and offset on each rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 3, 16, 16, generator=gen) * (1 + 2 * rank) + rank for _ in range(n)]


def _minmax_batches(rank: int) -> list[torch.Tensor]:
    """Shifted so that rank 0 holds the smallest values and rank 1 the largest."""
    return [x + 10 * rank - 5 for x in _rank_batches(rank)]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in quant_buffers(model).items()}


def _recomputed(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: tuple(t.clone() for t in m.activation_post_process.calculate_qparams())
        for name, m in model.named_modules()
        if isinstance(m, FakeQuantizeBase)
    }


def _counted_sync(model, calls: list[int]) -> dict:
    calls[0] = 0
    stats = sync_quant_stats(model)
    return {**dataclasses.asdict(stats), "counted": calls[0]}


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    calls = [0]
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls[0] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce  # this worker process only: count the collectives
    out = {}
    try:
        template = _prepared()

        model = copy.deepcopy(template)
        for x in _rank_batches(rank):
            model(x)  # train mode: observers and BatchNorm running stats update
        out["real_before"] = _snapshot(model)
        out["real_stats"] = _counted_sync(model, calls)
        out["real_after"] = _snapshot(model)
        out["real_recomputed"] = _recomputed(model)
        out["again_stats"] = _counted_sync(model, calls)
        out["again_after"] = _snapshot(model)

        made = copy.deepcopy(model)  # constructed values with a known answer
        per_tensor = made.activation_post_process_0.activation_post_process
        per_tensor.min_val.fill_(-1.0 - rank)
        per_tensor.max_val.fill_(2.0 + 3 * rank)
        per_channel = made.activation_post_process_1.activation_post_process
        channels = torch.arange(1, per_channel.min_val.numel() + 1, dtype=torch.float32)
        per_channel.min_val.copy_(-channels * (1 + rank))
        per_channel.max_val.copy_(channels * (0.5 + 2 * rank))
        bn_mean = made.get_buffer("features.1.running_mean")
        bn_var = made.get_buffer("features.1.running_var")
        bn_mean.copy_(torch.arange(8.0) * (rank + 1) - rank)
        bn_var.copy_(0.5 + torch.arange(8.0) * (1 + 3 * rank))
        made.get_buffer("features.1.num_batches_tracked").fill_(3 + 4 * rank)
        out["made_before"] = _snapshot(made)
        sync_quant_stats(made)
        out["made_after"] = _snapshot(made)

        holder = MinMaxHolder()
        for x in _minmax_batches(rank):
            holder(x)
        union = MinMaxHolder()  # one process that saw both ranks' batches
        for x in _minmax_batches(0) + _minmax_batches(1):
            union(x)
        out["minmax_before"] = _snapshot(holder)
        out["minmax_stats"] = dataclasses.asdict(sync_quant_stats(holder))
        out["minmax_after"] = _snapshot(holder)
        out["minmax_union"] = _snapshot(union)

        half = copy.deepcopy(template)  # only rank 0 has observed anything
        if rank == 0:
            half(_rank_batches(0, n=1)[0])
        out["half_before"] = _snapshot(half)
        out["half_stats"] = dataclasses.asdict(sync_quant_stats(half))
        out["half_after"] = _snapshot(half)

        fresh = copy.deepcopy(template)  # no rank has observed anything
        out["fresh_before"] = _snapshot(fresh)
        out["fresh_stats"] = dataclasses.asdict(sync_quant_stats(fresh))
        out["fresh_after"] = _snapshot(fresh)

        deep = _prepared(blocks=5)
        for x in _rank_batches(rank, n=1):
            deep(x)
        out["deep_stats"] = _counted_sync(deep, calls)
        out["deep_after"] = _snapshot(deep)
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()
    torch.save(out, f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() + b.double()) / 2).to(a.dtype)


def test_real_data_makes_every_buffer_bitwise_identical(ranks):
    r0, r1 = ranks
    before = [r["real_before"] for r in ranks]
    kinds = ("scale", "zero_point", "min_val", "max_val", "running_mean", "running_var")
    kinds += ("num_batches_tracked", "fake_quant_enabled", "observer_enabled")
    assert {key.rpartition(".")[2] for key in before[0]} >= set(kinds)
    differing = [k for k in before[0] if not torch.equal(before[0][k], before[1][k])]
    assert any(k.endswith("min_val") for k in differing)
    assert any(k.endswith("running_var") for k in differing)
    assert any(k.endswith("scale") for k in differing)
    _assert_identical(r0["real_after"], r1["real_after"])
    assert r0["real_stats"]["max_divergence_before"] > 0.1
    for r in ranks:
        assert r["real_stats"]["max_divergence_after"] == 0.0
        assert r["real_stats"]["seconds"] > 0


def test_real_data_reductions(ranks):
    (b0, b1), after = [r["real_before"] for r in ranks], ranks[0]["real_after"]
    observed = [k for k in after if k.endswith(("min_val", "max_val"))]
    assert len(observed) == 2 * 6  # 6 fake quants: 3 activations, 3 weights
    for key in observed:  # moving-average observers: the mean of the ranks' running values
        assert torch.equal(after[key], _mean(b0[key], b1[key])), key
    for prefix in ("features.1.", "features.4."):
        m0, m1 = b0[prefix + "running_mean"], b1[prefix + "running_mean"]
        v0, v1 = b0[prefix + "running_var"], b1[prefix + "running_var"]
        torch.testing.assert_close(after[prefix + "running_mean"], (m0 + m1) / 2)
        pooled = (v0.double() + v1.double()) / 2 + ((m0.double() - m1.double()) / 2) ** 2
        torch.testing.assert_close(after[prefix + "running_var"], pooled.float())
        assert after[prefix + "num_batches_tracked"] == 3


def test_qparams_are_recomputed_from_the_synced_observers(ranks):
    for r in ranks:
        after = r["real_after"]
        assert len(r["real_recomputed"]) == 6
        for name, (scale, zero_point) in r["real_recomputed"].items():
            assert torch.equal(after[f"{name}.scale"], scale), name
            assert torch.equal(after[f"{name}.zero_point"], zero_point.to(torch.int32)), name
        assert after["activation_post_process_1.scale"].numel() == 8  # per channel


def test_second_sync_is_a_bitwise_no_op(ranks):
    for r in ranks:
        assert r["again_stats"]["max_divergence_before"] == 0.0
        _assert_identical(r["again_after"], r["real_after"])


def test_constructed_values_give_the_closed_form(ranks):
    after = ranks[0]["made_after"]
    _assert_identical(after, ranks[1]["made_after"])
    observer = "activation_post_process_0.activation_post_process."
    assert after[observer + "min_val"].item() == -1.5  # mean of -1 and -2
    assert after[observer + "max_val"].item() == 3.5  # mean of 2 and 5
    observer = "activation_post_process_1.activation_post_process."
    channels = torch.arange(1, 9, dtype=torch.float32)
    assert torch.equal(after[observer + "min_val"], -channels * 1.5)
    assert torch.equal(after[observer + "max_val"], channels * 1.5)
    means = [torch.arange(8.0), torch.arange(8.0) * 2 - 1]
    variances = [0.5 + torch.arange(8.0), 0.5 + torch.arange(8.0) * 4]
    expected_mean = (means[0] + means[1]) / 2
    expected_var = (variances[0] + variances[1]) / 2 + (means[0] - means[1]) ** 2 / 4
    assert torch.equal(after["features.1.running_mean"], expected_mean)
    torch.testing.assert_close(after["features.1.running_var"], expected_var, rtol=1e-7, atol=0)
    assert after["features.1.num_batches_tracked"].item() == 7  # max of 3 and 7
    scale = after["activation_post_process_0.scale"]
    assert math.isclose(scale.item(), (3.5 + 1.5) / 255, rel_tol=1e-6)  # from the new range


def test_min_max_observers_match_one_process_that_saw_the_union(ranks):
    r0, r1 = ranks
    _assert_identical(r0["minmax_after"], r1["minmax_after"])
    union = r0["minmax_union"]
    for key in union:
        if key.endswith(("min_val", "max_val", "scale", "zero_point")):
            assert torch.equal(r0["minmax_after"][key], union[key]), key
    low, high = "act.activation_post_process.min_val", "act.activation_post_process.max_val"
    assert torch.equal(r0["minmax_before"][low], union[low])  # the min is rank 0's ...
    assert torch.equal(r1["minmax_before"][high], union[high])  # ... and the max rank 1's
    assert r0["minmax_before"][high] < union[high]
    assert r1["minmax_before"][low] > union[low]
    assert r0["minmax_stats"]["max_divergence_before"] > 0
    assert r0["minmax_stats"]["max_divergence_after"] == 0.0


def test_a_rank_that_has_not_observed_adopts_the_others(ranks):
    r0, r1 = ranks
    unobserved = r1["half_before"]
    assert unobserved["activation_post_process_0.activation_post_process.min_val"] == math.inf
    assert unobserved["activation_post_process_1.activation_post_process.min_val"].numel() == 0
    _assert_identical(r0["half_after"], r1["half_after"])
    for key, value in r0["half_after"].items():
        assert not value.is_floating_point() or not value.isnan().any(), key
        if key.endswith(("min_val", "max_val")):
            assert torch.equal(value, r0["half_before"][key]), key  # rank 0's, unchanged
    for r in ranks:
        assert r["half_stats"]["max_divergence_before"] == math.inf
        assert r["half_stats"]["max_divergence_after"] == 0.0


def test_no_rank_observed_leaves_infinities_and_qparams(ranks):
    for r in ranks:
        before, after = r["fresh_before"], r["fresh_after"]
        _assert_identical(before, after)
        assert after["activation_post_process_0.activation_post_process.max_val"] == -math.inf
        assert after["activation_post_process_0.scale"].item() == 1.0
        assert r["fresh_stats"]["max_divergence_before"] == 0.0
        assert r["fresh_stats"]["max_divergence_after"] == 0.0
    _assert_identical(ranks[0]["fresh_after"], ranks[1]["fresh_after"])


def test_collectives_are_few_and_independent_of_the_buffer_count(ranks):
    for r in ranks:
        small, deep = r["real_stats"], r["deep_stats"]
        assert deep["num_buffers"] > 2 * small["num_buffers"]
        assert small["counted"] == small["num_collectives"] == deep["counted"]
        assert deep["num_collectives"] == deep["counted"] <= 4
        assert deep["max_divergence_after"] == 0.0
    _assert_identical(ranks[0]["deep_after"], ranks[1]["deep_after"])


def test_world_size_one_recomputes_qparams_only():
    assert not dist.is_initialized()
    torch.set_num_threads(1)
    model = MinMaxHolder()
    model(torch.randn(4, 3, 8, 8))
    model.act.scale.fill_(123.0)
    model.weight.scale.fill_(7.0)
    before = _snapshot(model)
    stats = sync_quant_stats(model)
    assert stats == SyncStats(0.0, 0.0, stats.seconds, 8, 0)
    after = _snapshot(model)
    for key in before:
        if not key.endswith(("scale", "zero_point")):
            assert torch.equal(before[key], after[key]), key
    scale, _ = model.act.activation_post_process.calculate_qparams()
    assert torch.equal(after["act.scale"], scale) and scale.item() != 123.0
    assert after["weight.scale"].numel() == 4  # per channel: the 4 rows of the input


def test_unsupported_observer_is_an_error():
    from torchao.quantization.pt2e.observer import HistogramObserver

    holder = nn.Module()
    holder.obs = HistogramObserver()
    with pytest.raises(TypeError, match="HistogramObserver"):
        sync_quant_stats(holder)
