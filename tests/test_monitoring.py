"""Monitoring: the TensorBoard events of the real 2-rank run (read back with TensorBoard's own
event reader), the per-layer quant inspection on a tiny prepared model, and console progress
on a pseudo-terminal and on a pipe."""

from __future__ import annotations

import math
import os
import pty
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qatdist.monitor import union_seconds
from qatdist.quant import inspect as qi

SIZE_GUIDANCE = {
    k: 0 for k in ("scalars", "histograms", "tensors", "images", "audio", "compressedHistograms")
}
RESNET18_WEIGHT_LAYERS = 21  # 20 convolutions + fc


@pytest.fixture(scope="module")
def run(two_rank_run):
    result = two_rank_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_rank_run["out_dir"] / "tb"), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    cfg = tomllib.loads((two_rank_run["out_dir"] / "resolved_config.toml").read_text())
    return SimpleNamespace(acc=acc, cfg=cfg, report=two_rank_run["report"], result=result)


def _series(run, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in run.acc.Scalars(tag)}


def _tags(run) -> set[str]:
    return set(run.acc.Tags()["scalars"])


def _log_steps(run) -> list[int]:
    every = run.cfg["train"]["log_every_steps"]
    total = run.report["steps"]
    return sorted({s for s in range(1, total + 1) if s % every == 0} | {total})


def test_train_tags_follow_the_schedule(run):
    from qatdist.optim import warmup_cosine

    steps = _log_steps(run)
    loss, top1, lr = (_series(run, f"train/{k}") for k in ("loss", "top1", "lr"))
    assert sorted(loss) == sorted(top1) == sorted(lr) == steps
    assert all(math.isfinite(v) and v > 0 for v in loss.values())
    assert all(0.0 <= v <= 1.0 for v in top1.values())
    o, t = run.cfg["optim"], run.cfg["train"]
    for step, value in lr.items():
        expected = t["lr"] * warmup_cosine(
            step, warmup=o["warmup_steps"], total=run.report["steps"], min_ratio=o["min_lr_ratio"]
        )
        assert value == pytest.approx(expected, rel=1e-5)


def test_perf_tags(run):
    steps = _log_steps(run)
    for tag in ("images_per_s", "step_seconds", "allreduce_seconds_per_step"):
        series = _series(run, f"perf/{tag}")
        assert sorted(series) == steps
        assert all(v > 0 for v in series.values()), tag
    for tag in ("data_wait_fraction", "allreduce_fraction", "sync_fraction"):
        assert all(0.0 <= v <= 1.0 for v in _series(run, f"perf/{tag}").values()), tag
    sync = _series(run, "perf/sync_seconds")
    every = run.cfg["quant"]["sync_every_steps"]
    assert {s for s in steps if s % every == 0} <= set(sync) and all(v > 0 for v in sync.values())
    for rank in (0, 1):  # gathered from both ranks, written by rank 0
        cpu = _series(run, f"perf/rank{rank}/cpu_percent")
        rss = _series(run, f"perf/rank{rank}/rss_mb")
        assert sorted(cpu) == sorted(rss) == steps
        assert all(v >= 0 for v in cpu.values()) and any(v > 0 for v in cpu.values())
        assert all(100 < v < 100_000 for v in rss.values())  # a resnet18 rank: about 1 GB
    assert not any(t.startswith("perf/rank2/") for t in _tags(run))


def test_qat_flags_switch_at_the_configured_steps(run):
    q = run.cfg["quant"]
    configured = {
        "fake_quant_on": q["fake_quant_start_step"],
        "observers_frozen": q["observer_freeze_step"],
        "bn_frozen": q["bn_freeze_step"],
    }
    for flag, switch in configured.items():
        series = _series(run, f"quant/{flag}")
        assert sorted(series) == _log_steps(run)
        # x = s is the s-th step, which ran with the phase of 0-based step s - 1
        assert series == {s: float(s - 1 >= switch) for s in series}, flag
        assert set(series.values()) == {0.0, 1.0}, f"{flag} never switches in this run"


def test_quant_layer_summaries_at_sync_points(run):
    tags = _tags(run)
    sqnr_tags = sorted(t for t in tags if t.startswith("quant/weight_sqnr_db/"))
    layers = [t.rpartition("/")[2] for t in sqnr_tags]
    assert len(layers) == RESNET18_WEIGHT_LAYERS
    assert {"conv1", "fc", "layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"} <= set(
        layers
    )
    every = run.cfg["quant"]["sync_every_steps"]
    sync_steps = set(_series(run, "perf/sync_seconds"))
    for tag in sqnr_tags:
        series = _series(run, tag)
        assert all(math.isfinite(v) and v > 0 for v in series.values()), tag
        # only at statistics syncs, not every step
        assert set(series) == sync_steps and len(series) < run.report["steps"]
        assert {s for s in _log_steps(run) if s % every == 0} <= set(series)
    for layer in layers:
        lo, mean, hi = (
            _series(run, f"quant/weight_scale_{k}/{layer}") for k in ("min", "mean", "max")
        )
        assert all(0 < lo[s] <= mean[s] <= hi[s] for s in mean), layer
    act_layers = [t.rpartition("/")[2] for t in tags if t.startswith("quant/act_scale/")]
    assert {"input", "maxpool", "layer1.0.relu", "layer1.0.relu@1", "avgpool"} <= set(act_layers)
    for layer in act_layers:
        assert all(v > 0 for v in _series(run, f"quant/act_scale/{layer}").values())
        zero_points = _series(run, f"quant/act_zero_point/{layer}").values()
        assert all(0 <= v <= 255 and v == int(v) for v in zero_points)
    histogram = run.acc.Histograms("quant/weight_sqnr_db")
    assert histogram and histogram[-1].histogram_value.num == RESNET18_WEIGHT_LAYERS
    table = run.acc.Tensors("quant/layers/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| activation_post_process_0 | activation | input |" in table


def test_eval_final_config_and_hparams(run):
    report = run.report
    last = report["steps"]
    for tag in ("eval/fake_quant_top1", "eval/int8_top1"):
        series = _series(run, tag)
        assert last in series and 0.0 <= series[last] <= 1.0
    final = {t.partition("/")[2]: _series(run, t)[last] for t in _tags(run) if "final/" in t}
    for key in ("int8_top1", "fp32_fake_quant_top1", "int8_latency_ms", "fp32_latency_ms"):
        assert final[key] == pytest.approx(report[key], rel=1e-6)
    assert final["int8_speedup"] == pytest.approx(
        final["fp32_latency_ms"] / final["int8_latency_ms"], rel=1e-5
    )
    assert 0 < final["monitor_overhead_fraction"] < 1
    tensors = run.acc.Tags()["tensors"]
    assert {"config/resolved/text_summary", "config/placement/text_summary"} <= set(tensors)

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = run.acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model"].string_value == "resnet18"
    assert hparams["lr"].number_value == pytest.approx(run.cfg["train"]["lr"])
    assert hparams["world_size"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/int8_top1", "final/int8_speedup", "final/int8_latency_ms"} <= metrics


def test_console_only_rank0_plain_lines(run):
    lines = [line for line in run.result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == len(_log_steps(run))  # one line per log step, from rank 0 only
    assert "\r" not in run.result.stdout and "[#" not in run.result.stdout
    assert all("img/s" in line and "eta" in line and "epoch" in line for line in lines)
    assert not [
        line
        for line in run.result.stderr.splitlines()
        if line.startswith("[rank1] ") and " INFO " in line
    ]  # other ranks log warnings and errors only


# --- the inspect module on a tiny prepared model --------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


@pytest.fixture(scope="module")
def tiny_prepared():
    from qatdist.config import QuantConfig
    from qatdist.quant import QatModel

    torch.manual_seed(0)
    gm = QatModel.from_fp32(_Tiny(), QuantConfig(), image_size=8).prepared
    for _ in range(3):
        gm(torch.randn(4, 3, 8, 8))
    return gm


def test_quant_points_name_layers_from_the_graph(tiny_prepared):
    points = qi.quant_points(tiny_prepared)
    by_kind = {
        kind: {p.layer: p for p in points if p.kind == kind} for kind in ("weight", "activation")
    }
    assert set(by_kind["weight"]) == {"conv", "fc"}
    assert by_kind["weight"]["conv"].feeds == ("conv",)
    assert {"input", "relu"} <= set(by_kind["activation"])
    assert by_kind["activation"]["input"].feeds == ("conv",)
    assert len({p.module for p in points}) == len(points)
    assert all(p.module.startswith("activation_post_process_") for p in points)
    table = qi.points_table(points)
    assert all(p.module in table for p in points)


def test_weight_input_is_the_bn_folded_weight(tiny_prepared):
    gm = tiny_prepared
    conv = next(p for p in qi.quant_points(gm) if p.layer == "conv")
    bn_scale = gm.bn.weight / torch.sqrt(gm.bn.running_var + 1e-5)
    folded = gm.conv.weight * bn_scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(qi.weight_input(gm, conv), folded.detach())


def test_summarize_reads_without_changing_the_model(tiny_prepared):
    from qatdist.quant.sync import quant_buffers

    before = {k: v.clone() for k, v in quant_buffers(tiny_prepared).items()}
    summaries = qi.summarize(tiny_prepared)
    after = quant_buffers(tiny_prepared)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for s in summaries:
        assert 0 < s.scale_min <= s.scale_mean <= s.scale_max
        if s.point.kind == "weight":
            assert s.sqnr_db is not None and math.isfinite(s.sqnr_db) and s.sqnr_db > 20
        else:
            assert s.sqnr_db is None


def test_sqnr_closed_form():
    x = torch.tensor([3.0, -4.0, 0.0, 12.0])
    e = torch.tensor([0.1, 0.0, -0.2, 0.2])
    expected = 10 * math.log10((9 + 16 + 144) / (0.01 + 0.04 + 0.04))
    assert qi.sqnr_db(x, x + e) == pytest.approx(expected, rel=1e-5)
    assert qi.sqnr_db(x, x) == math.inf
    # per tensor, scale 0.1: 0.12 -> 0.1, -0.27 -> -0.3, 0.5 -> 0.5, 0.04 -> 0.0
    fq = SimpleNamespace(
        scale=torch.tensor([0.1]),
        zero_point=torch.tensor([0]),
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
        ch_axis=-1,
    )
    w = torch.tensor([0.12, -0.27, 0.5, 0.04])
    torch.testing.assert_close(qi.fake_quantize(fq, w), torch.tensor([0.1, -0.3, 0.5, 0.0]))
    signal = 0.12**2 + 0.27**2 + 0.5**2 + 0.04**2
    noise = 0.02**2 + 0.03**2 + 0.0 + 0.04**2
    assert qi.sqnr_db(w, qi.fake_quantize(fq, w)) == pytest.approx(
        10 * math.log10(signal / noise), rel=1e-4
    )


def _symmetric_per_channel(w: torch.Tensor, bits: int) -> SimpleNamespace:
    qmax = 2 ** (bits - 1) - 1
    return SimpleNamespace(
        scale=w.abs().amax(dim=(1, 2, 3)) / qmax,
        zero_point=torch.zeros(w.shape[0], dtype=torch.int32),
        quant_min=-qmax - 1,
        quant_max=qmax,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def test_sqnr_grows_about_6db_per_bit_and_matches_torch_fake_quant():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    sqnr = {}
    for bits in (4, 6, 8):
        fq = _symmetric_per_channel(w, bits)
        ours = qi.fake_quantize(fq, w)
        reference = torch.fake_quantize_per_channel_affine(
            w, fq.scale, fq.zero_point, 0, fq.quant_min, fq.quant_max
        )
        torch.testing.assert_close(ours, reference)
        sqnr[bits] = qi.sqnr_db(w, ours)
    assert sqnr[4] < sqnr[6] < sqnr[8]
    for low, high in ((4, 6), (6, 8)):
        assert sqnr[high] - sqnr[low] == pytest.approx(2 * 6.02, abs=1.5)


def test_union_seconds_counts_overlap_once():
    assert union_seconds([]) == 0.0
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == pytest.approx(4.0)


# --- console ----------------------------------------------------------------------------------

_PROGRESS = textwrap.dedent("""
    from pathlib import Path
    from qatdist.config import DataConfig, LogConfig
    from qatdist.monitor import Monitor, setup_logging
    from qatdist.tasks.classification import Classification
    setup_logging(0)
    task = Classification(DataConfig())
    m = Monitor(Path("."), LogConfig(tensorboard=False), task, enabled=True, total_steps=4)
    for step in (1, 2, 3, 4):
        m.progress(step=step, epoch=0, loss=1.5, images_per_s=100.0, step_s=0.5)
    m.info("after the bar")
    m.close()
""")


def test_progress_bar_on_a_terminal():
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROGRESS], stdout=secondary, stderr=secondary, close_fds=True
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode()
    assert "\r[#######" in out and "\r[" + "#" * 30 + "] step 4/4" in out
    assert "] step 2/4 epoch 0 loss 1.5000 100.0 img/s eta 0:01" in out
    assert out.count("\n") >= 2  # the finished bar ends its line before the log message
    assert "step 4/4" in out.split("after the bar")[0]


def test_plain_lines_when_not_a_terminal():
    result = subprocess.run(
        [sys.executable, "-c", _PROGRESS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"step {s}/4 epoch 0 loss 1.5000 100.0 img/s eta {eta}"
        for s, eta in ((1, "0:01"), (2, "0:01"), (3, "0:00"), (4, "0:00"))
    ]
    assert "after the bar" in result.stderr


# --- ETA and the end of a run -------------------------------------------------------------------


def test_eta_rate_leaves_out_one_time_and_outlier_steps():
    from qatdist.monitor import StepRate

    rate = StepRate()
    assert rate.seconds_per_step() is None
    rate.add(30.0, one_time=True)  # first step: warm-up
    rate.add(0.5)
    rate.add(0.7)
    assert rate.seconds_per_step() == pytest.approx(0.6)
    rate.add(40.0)  # fake quant switches on: kernels compile, nobody flagged it
    rate.add(0.5)
    assert rate.seconds_per_step() == pytest.approx(0.5667, abs=1e-4)
    rate.add(12.0, one_time=True)  # flagged phase change
    assert rate.seconds_per_step() == pytest.approx(0.5667, abs=1e-4)
    steady_but_uneven = StepRate()
    for seconds in (1.0, 1.0, 2.5):  # a sync step every third step is a real, recurring cost
        steady_but_uneven.add(seconds)
    assert steady_but_uneven.seconds_per_step() == pytest.approx(1.5)


def test_eta_ignores_the_compile_at_the_phase_switch(capsys):
    from qatdist.config import DataConfig, LogConfig
    from qatdist.monitor import Monitor
    from qatdist.tasks.classification import Classification

    task = Classification(DataConfig())
    m = Monitor(Path("."), LogConfig(tensorboard=False), task, enabled=True, total_steps=100)
    m.is_tty = False
    for step, seconds in enumerate([20.0, 1.0, 1.0, 1.0, 60.0, 1.0], start=1):
        m.rate.add(seconds, one_time=step == 1)
    window_mean = 61.0 / 2  # steps 5 and 6, the log window
    m.progress(step=6, epoch=0, loss=1.0, images_per_s=1.0, step_s=window_mean)
    assert capsys.readouterr().out.strip().endswith("eta 1:34")  # 94 steps x 1 s


def test_final_prints_baselines_and_writes_them_to_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qatdist.config import DataConfig, LogConfig
    from qatdist.monitor import Monitor
    from qatdist.run.report import with_derived
    from qatdist.tasks.classification import Classification

    report = with_derived(
        {
            "steps": 8,
            "world_size": 2,
            "global_batch_size": 16,
            "fp32_fake_quant_top1": 0.5,
            "int8_top1": 0.62,
            "fp32_top1": 0.65,
            "ptq_int8_top1": 0.55,
            "int8_latency_ms": 1.0,
            "fp32_latency_ms": 2.0,
            "int8_speedup": 2.0,
            "train_images_per_s": 10.0,
        }
    )
    task = Classification(DataConfig())
    m = Monitor(tmp_path, LogConfig(tensorboard=True), task, enabled=True, total_steps=8)
    m.final(report, {"model": "resnet18", "lr": 0.05})
    m.close()
    out = capsys.readouterr().out
    assert "baselines (top-1 on the validation shards):" in out
    for text in ("fp32, final weights  0.6500", "PTQ int8 (no QAT)", "+0.0700", "+0.0300"):
        assert text in out
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    for key in ("fp32_top1", "ptq_int8_top1", "int8_top1"):
        assert acc.Scalars(f"final/{key}")[-1].value == pytest.approx(report[key])
