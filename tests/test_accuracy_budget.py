"""Accuracy budget search: a model with one quantization-hostile layer misses the
budget in full int8; the search ranks that layer first, keeps it in fp32 and meets the budget,
on one rank and split over 2 real gloo ranks.

The hostile layer: conv1 emits a constant 1e4 channel (zero weights, bias 1e4) that conv2
ignores (zero weights). In float that changes nothing; quantized, conv2's per-tensor input scale
becomes 1e4/255, every real activation rounds to 0 and the int8 model predicts one class.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchao.quantization.pt2e.fake_quantize import disable_fake_quant, enable_fake_quant

from qatdist.config import DataConfig, OptimConfig, QuantConfig
from qatdist.quant.accuracy import (
    BudgetResult,
    SensitivityRow,
    full_val_score,
    greedy_order,
    meet_accuracy_budget,
)
from qatdist.quant.capture import capture
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.layer_error import layer_sqnr_db, make_rebuilder, quantized_layer_taps
from qatdist.quant.prepare import prepare_qat
from qatdist.tasks.classification import Classification

CLASSES, SIZE, SPIKE = 4, 16, 1e4
LAYERS = ["conv1", "conv2", "conv3", "fc"]


class HostileNet(nn.Module):
    """conv-ReLU x3, pool, linear; `hostile` convs get a spike channel in their input."""

    def __init__(self, hostile: tuple[str, ...]):
        super().__init__()
        self.hostile = hostile
        self.conv1 = nn.Conv2d(3, 9, 3, padding=1)
        self.conv2 = nn.Conv2d(9, 9, 3, padding=1)
        self.conv3 = nn.Conv2d(9, 8, 3, padding=1)
        self.fc = nn.Linear(8, CLASSES)
        self.masks = {}
        with torch.no_grad():
            for producer, consumer in (("conv1", "conv2"), ("conv2", "conv3")):
                if consumer not in hostile:
                    continue
                prod, cons = getattr(self, producer), getattr(self, consumer)
                prod.weight[8].zero_()
                prod.bias[8] = SPIKE
                cons.weight[:, 8].zero_()
                self._freeze(prod.weight, (8,))
                self._freeze(prod.bias, (8,))
                self._freeze(cons.weight, (slice(None), 8))

    def _freeze(self, param: torch.Tensor, index: tuple) -> None:
        mask = torch.ones_like(param)
        mask[index] = 0
        param.register_hook(lambda grad: grad * mask)  # the spike path stays exactly as set

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # class = a colour (a corner of the RGB cube): separable after global pooling
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]])
    templates = colours[:, :, None, None].expand(CLASSES, 3, SIZE, SIZE)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    images = templates[labels] + 0.8 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return images, labels


def _batches(images, labels, size: int = 50):
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def trained_state(hostile: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Float training to a clear accuracy on the synthetic task (about 1 s)."""
    torch.manual_seed(0)
    model = HostileNet(hostile)
    images, labels = _dataset(400, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        for x, y in _batches(images, labels, 40):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict()


def setup(state: dict, hostile: tuple[str, ...], **quant) -> dict:
    """Prepared model with calibrated observers, and the search's inputs."""
    cfg = dataclasses.replace(QuantConfig(max_accuracy_drop=0.05), **quant)
    model = HostileNet(hostile)
    model.load_state_dict(state)
    example = torch.randn(2, 3, SIZE, SIZE)
    prepared = prepare_qat(capture(model, example), cfg)
    train_images, _ = _dataset(400, seed=1)
    # Observers calibrated on float activations (fake quant off, as before QAT's fake-quant
    # start): calibrated through a broken conv2, conv3's input range would stay broken when conv2
    # goes float, and only fine-tuning (quant.fallback_finetune_steps) could repair it.
    prepared.apply(disable_fake_quant)
    with torch.no_grad():
        for x in train_images.split(100):
            prepared(x)
    prepared.apply(enable_fake_quant)
    val = _batches(*_dataset(200, seed=2))
    return {
        "prepared": prepared,
        "quant_cfg": cfg,
        "rebuild": make_rebuilder(model, example, cfg),
        "evaluate": full_val_score(Classification(DataConfig(num_classes=CLASSES)), lambda: val),
        "calibration_batches": [x for x, _ in val[:2]],
        "latency_cost": lambda candidate, baseline: 0.25,  # no Inductor compile in tests
    }


@pytest.fixture(scope="module")
def one_hostile_state():
    return trained_state(("conv2",))


def test_full_int8_misses_budget_and_search_keeps_hostile_layer_in_float(one_hostile_state):
    inputs = setup(one_hostile_state, ("conv2",), sensitivity_candidates=2)
    result = meet_accuracy_budget(**inputs)
    assert result.fp32_score > 0.9, "the float model must be clearly accurate"
    assert result.fp32_score - result.initial_int8_score > 0.3, "full int8 must miss the budget"
    assert [row.layer for row in result.sensitivity][0] == "conv2"
    assert sorted(row.layer for row in result.sensitivity) == LAYERS
    assert result.accuracy_budget_met
    assert result.fp32_fallback_layers == ["conv2"]
    assert result.fp32_score - result.int8_score <= 0.05
    assert result.candidates_evaluated_per_rank == [2]
    measured = [r for r in result.sensitivity if r.gain_when_float is not None]
    assert len(measured) == 2 and all(r.latency_cost_ms == 0.25 for r in measured)
    gain = {r.layer: r.gain_when_float for r in measured}
    assert gain["conv2"] == max(gain.values()) and gain["conv2"] > 0.3
    # the returned model is the one measured: conv2 is no longer quantized, others still are
    int8 = convert_to_int8(result.model)
    assert inputs["evaluate"](int8) == result.int8_score
    assert set(layer_sqnr_db(result.model, inputs["calibration_batches"])) == set(LAYERS) - {
        "conv2"
    }
    report = result.to_report("top1")
    assert set(report) == {
        "accuracy_budget",
        "accuracy_budget_met",
        "fp32_fallback_layers",
        "sensitivity",
        "candidates_evaluated_per_rank",
    }
    assert set(report["sensitivity"][0]) == {
        "layer",
        "sqnr_db",
        "top1_gain_when_float",
        "latency_cost_ms",
    }
    json.dumps(report)  # finite numbers only


def test_rebuild_without_fp32_layers_reproduces_the_int8_model(one_hostile_state):
    inputs = setup(one_hostile_state, ("conv2",))
    prepared = inputs["prepared"]
    rebuilt = inputs["rebuild"](prepared, [])
    x = inputs["calibration_batches"][0]
    assert torch.equal(convert_to_int8(prepared)(x), convert_to_int8(rebuilt)(x))


def test_rebuild_carries_state_over_conv_bn_fusion():
    """With BatchNorm, QAT's conv-BN rewrite creates the weight observers' inputs: the rebuilt
    model finds each one (same output with no layer in fp32) and drops the float layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    )
    example = torch.randn(2, 3, SIZE, SIZE)
    cfg = QuantConfig()
    prepared = prepare_qat(capture(model, example), cfg)
    for x in torch.randn(3, 16, 3, SIZE, SIZE):
        prepared(x)  # moves weights' and activations' statistics away from their initial state
    rebuild = make_rebuilder(model, example, cfg)
    x = torch.randn(8, 3, SIZE, SIZE)
    reference = convert_to_int8(prepared)(x)
    assert torch.equal(convert_to_int8(rebuild(prepared, []))(x), reference)
    assert set(quantized_layer_taps(rebuild(prepared, ["3"]))) == {"0", "8"}


def test_budget_already_met_searches_nothing(one_hostile_state):
    inputs = setup(one_hostile_state, ("conv2",), max_accuracy_drop=1.0)
    result = meet_accuracy_budget(**inputs)
    assert result.accuracy_budget_met and result.fp32_fallback_layers == []
    assert result.candidates_evaluated_per_rank == [0]
    assert result.model is inputs["prepared"]


def test_unmeetable_budget_ends_with_best_model_found():
    """Two hostile layers, only one candidate measured: fixing it alone cannot meet the
    budget; with both candidates the greedy search keeps both in float and meets it."""
    state = trained_state(("conv2", "conv3"))
    calls = []
    result = meet_accuracy_budget(
        **setup(state, ("conv2", "conv3"), sensitivity_candidates=1, fallback_finetune_steps=2),
        finetune=lambda model, steps: calls.append(steps),
    )
    assert not result.accuracy_budget_met
    assert result.int8_score >= result.initial_int8_score
    assert result.fp32_score - result.int8_score > 0.05
    assert isinstance(result.model, torch.fx.GraphModule)
    assert calls == [2]  # fine-tuned once, after its one change
    both = meet_accuracy_budget(**setup(state, ("conv2", "conv3"), sensitivity_candidates=2))
    assert both.accuracy_budget_met
    assert sorted(both.fp32_fallback_layers) == ["conv2", "conv3"]


def test_greedy_order_prefers_cheap_layers_when_gains_tie():
    rows = [
        SensitivityRow("a", 1.0, 0.100, 0.9),
        SensitivityRow("b", 2.0, 0.099, 0.1),
        SensitivityRow("c", 3.0, 0.300, 5.0),
        SensitivityRow("d", 4.0, None, None),
    ]
    assert [r.layer for r in greedy_order(rows, gain_tolerance=0.002)] == ["c", "b", "a"]
    assert [r.layer for r in greedy_order(rows, gain_tolerance=0.0)] == ["c", "a", "b"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str, state: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result: BudgetResult = meet_accuracy_budget(
            **setup(state, ("conv2",), sensitivity_candidates=2)
        )
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(result.to_report("top1"), f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_candidates_and_agree(one_hostile_state, tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), one_hostile_state), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1]
    report = reports[0]
    assert [row["layer"] for row in report["sensitivity"]][0] == "conv2"
    assert report["candidates_evaluated_per_rank"] == [1, 1]
    assert report["accuracy_budget_met"] and report["fp32_fallback_layers"] == ["conv2"]
    measured = [r for r in report["sensitivity"] if r["top1_gain_when_float"] is not None]
    assert len(measured) == 2


# --- the trainer and export_final with a budget (real 2-rank torchrun) ----------------------

HOSTILE_LAYERS = {"conv1", "conv2", "conv3", "fc"}  # tests.hostile_model:hostile_cnn's


def _final_float_layers(folder) -> list[str]:
    """Layers the saved int8 program (model_int8.pt2) runs in float."""
    import qatdist.quant  # noqa: F401  (registers the quantized ops torch.export.load needs)
    from qatdist.quant.inspect import float_layers

    return float_layers(torch.export.load(str(folder / "model_int8.pt2")).module())


def _pretrained_hostile(shards: dict[str, str], factory: str = "hostile_cnn") -> torch.nn.Module:
    """A model of tests.hostile_model trained in float on the tiny shards (held in memory: a
    few seconds), clearly above chance, so that its int8 model (one class) misses a budget."""
    import hostile_model

    from qatdist import data
    from qatdist.config import DataConfig

    cfg = DataConfig(
        train_shards=shards["train_shards"],
        val_shards=shards["val_shards"],
        image_size=32,
        num_workers=0,
    )
    batches = [
        (b.images, b.target)
        for b in data.train_batches(
            cfg, Classification(cfg), batch_size=16, steps=10, rank=0, world_size=1, seed=0, epoch=0
        )
    ]
    torch.manual_seed(0)
    model = getattr(hostile_model, factory)(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for images, labels in batches:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@pytest.fixture(scope="module")
def budget_run(tiny_shards, tmp_path_factory) -> dict:
    """A 2-rank QAT fine-tuning run of the hostile CNN from pretrained fp32 weights with an
    accuracy budget of 0.05, 2 candidates and one fine-tuning step after each change."""
    from conftest import ROOT, tiny_run_args, torchrun

    out_dir = tmp_path_factory.mktemp("budget_run")
    weights = out_dir.parent / "hostile_fp32.pt"
    torch.save(_pretrained_hostile(tiny_shards).state_dict(), weights)
    args = tiny_run_args(
        tiny_shards,
        out_dir,
        "--model.name=tests.hostile_model:hostile_cnn",
        f"--model.weights={weights}",
        "--train.lr=0.002",
        "--quant.max_accuracy_drop=0.05",
        "--quant.sensitivity_candidates=2",
        "--quant.fallback_finetune_steps=1",
    )
    result = torchrun(args, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((out_dir / "final" / "report.json").read_text())
    return {"result": result, "out_dir": out_dir, "report": report}


def test_trainer_keeps_the_hostile_layer_in_float_and_saves_that_model(budget_run):
    report, final = budget_run["report"], budget_run["out_dir"] / "final"
    detail = {k: report.get(k) for k in ("fp32_top1", "int8_top1", "sensitivity")}
    rows = report["sensitivity"]
    assert sorted(row["layer"] for row in rows) == sorted(HOSTILE_LAYERS)  # the trained model's
    assert all(
        set(row) == {"layer", "sqnr_db", "top1_gain_when_float", "latency_cost_ms"} for row in rows
    )
    assert [row["sqnr_db"] for row in rows] == sorted(row["sqnr_db"] for row in rows)
    assert rows[0]["layer"] == "conv2", detail
    # full int8 missed the budget: 2 candidates measured, one by each rank
    assert report["budget_candidates_per_rank"] == [1, 1], detail
    measured = [row for row in rows if row["top1_gain_when_float"] is not None]
    assert len(measured) == 2
    assert all(isinstance(row["latency_cost_ms"], float) for row in measured)
    assert report["fp32_fallback_layers"][:1] == ["conv2"], detail
    assert report["accuracy_budget"] == 0.05
    assert report["accuracy_budget_met"] == (report["fp32_top1"] - report["int8_top1"] <= 0.05)
    # the saved int8 model is the chosen one: exactly the fallback layers stay in float
    assert sorted(_final_float_layers(final)) == sorted(report["fp32_fallback_layers"])
    assert report["quantization_complete"] is True
    assert "## Accuracy budget" in (final / "report.md").read_text()
    assert "Accuracy budget 0.0500" in budget_run["result"].stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(budget_run["out_dir"] / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("final/sensitivity/text_summary")[0].tensor_proto.string_val[0]
    assert text.decode().splitlines()[2].startswith("| conv2 | ")


def test_export_final_keeps_the_budget_layers_in_float(budget_run, tmp_path):
    """export_final reads the trainer's fp32_fallback_layers for the checkpoint's step and
    rebuilds the model with them in fp32."""
    from conftest import ROOT

    layers = budget_run["report"]["fp32_fallback_layers"]
    assert layers
    out = tmp_path / "export"
    command = [sys.executable, str(ROOT / "scripts" / "export_final.py")]
    command += ["--run-dir", str(budget_run["out_dir"]), "--out", str(out), "--batch-sizes", "4"]
    # the model factory (tests.hostile_model) imports from the repository root
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    exported = json.loads((out / "report.json").read_text())
    assert exported["fp32_fallback_layers"] == layers
    assert exported["quantization_complete"] is True
    assert sorted(_final_float_layers(out)) == sorted(layers)
    assert "kept in fp32 for the accuracy budget" in result.stdout


def test_unmeetable_budget_ends_with_the_best_model_and_a_warning(tiny_shards, tmp_path, caplog):
    """AccuracyBudget (the trainer's side) on one gloo rank: two hostile layers, one candidate
    measured, budget 0. The budget is not met, the returned model keeps the best layer found in
    fp32 (after one fine-tuning step), and a warning says so."""
    from qatdist import data
    from qatdist.distributed import DistEnv
    from qatdist.finish.accuracy_budget import AccuracyBudget
    from qatdist.quant import QatModel
    from qatdist.quant.inspect import annotated_layers

    model = _pretrained_hostile(tiny_shards, "two_hostile_cnn")
    data_cfg = DataConfig(
        train_shards=tiny_shards["train_shards"],
        val_shards=tiny_shards["val_shards"],
        image_size=32,
        num_workers=0,
    )
    quant = QuantConfig(max_accuracy_drop=0.0, sensitivity_candidates=1, fallback_finetune_steps=1)
    task = Classification(data_cfg)
    budget = AccuracyBudget(
        task,
        quant,
        DistEnv(0, 1, 0, 1, 0),
        val_batches=data.full_val_batches(data_cfg, task),
        train_batches=lambda steps, seed: data.train_batches(
            data_cfg, task, batch_size=32, steps=steps, rank=0, world_size=1, seed=seed, epoch=0
        ),
        optim_cfg=OptimConfig(),
        peak_lr=0.05,
        grad_compression="none",
        image_size=32,
        batch_size=8,
        latency_iters=3,
        compiled=False,
    )
    qat = QatModel.from_fp32(model, quant, image_size=32)
    with torch.no_grad():  # observers calibrated on a few batches, as a short QAT would
        for _ in range(3):
            qat.prepared(torch.rand(8, 3, 32, 32) * 2 - 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with caplog.at_level("WARNING", logger="qatdist"):
            final, fields = budget.apply(qat, None, finetune_lr=0.001, seed=0)
    finally:
        dist.destroy_process_group()
    assert fields["accuracy_budget"] == 0.0 and fields["accuracy_budget_met"] is False
    assert fields["budget_candidates_per_rank"] == [1]
    assert "int8_top1" not in fields and "fp32_top1" not in fields  # finalize's to measure
    top = fields["sensitivity"][0]["layer"]
    assert top in ("conv2", "conv3")
    # the other hostile layer still breaks int8: the candidate alone gains nothing (or, if the
    # first broken layer hid the second's damage, something); the best model found is kept
    if fields["sensitivity"][0]["top1_gain_when_float"] > 0:
        assert fields["fp32_fallback_layers"] == [top]
        kept = annotated_layers(final.prepared)["conv"]
        assert top not in kept and "conv1" in kept
        assert final.quant_cfg.fp32_module_names == [top]
    else:
        assert fields["fp32_fallback_layers"] == [] and final is qat
    assert "accuracy budget NOT met" in caplog.text


def test_fallback_to_fp32_accepts_attention_projections_called_as_functions():
    """A MultiheadAttention's input projection is a parameter, not a module: the budget (and
    export_final) can still keep it fp32 by its quantized-layer name; unknown names fail."""
    from qatdist.finish.accuracy_budget import with_fp32_layers
    from qatdist.models import tiny_vit
    from qatdist.quant import QatModel
    from qatdist.quant.inspect import annotated_layers

    torch.manual_seed(0)
    qat = QatModel.from_fp32(tiny_vit(num_classes=CLASSES), QuantConfig(), image_size=32)
    projection = "encoder.layers.encoder_layer_0.self_attention.in_proj"
    assert projection in annotated_layers(qat.prepared)["linear"]
    kept = with_fp32_layers(qat, [projection], image_size=32)
    linears = annotated_layers(kept.prepared)["linear"]
    assert projection not in linears and len(linears) == 8
    assert torch.equal(
        kept.prepared.state_dict()["heads.head.weight"],
        qat.prepared.state_dict()["heads.head.weight"],
    )
    with pytest.raises(ValueError, match="no_such_layer"):
        with_fp32_layers(qat, ["encoder.no_such_layer"], image_size=32)
