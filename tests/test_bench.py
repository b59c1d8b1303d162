"""The benchmark's pieces (the repo's `benchmarks` package, `scripts/bench.py`) on a tiny conv
net with tiny settings: real measurements.

Only the int8 figure compiles (once, on the tiny net); the hand-written flow is checked
without compiling, through the eager converted models. Both convert, which is slow.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import benchmarks

ROOT = Path(__file__).resolve().parent.parent
# Spawned benchmark processes import the factory by name; pytest puts tests/ on sys.path and
# spawn passes sys.path on, so "test_bench" resolves in the children too.
TINY = f"{__name__}:tiny_net"


def tiny_net(num_classes: int) -> torch.nn.Module:
    """Conv-BN-ReLU twice (the second ReLU module called twice, as in ResNet), pool, linear."""
    return _TinyNet(num_classes)


class _TinyNet(torch.nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _positive_finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def figures() -> dict:
    """The cheap figures run once with tiny settings; tests below read the results."""
    return {
        "qat_step_ratio": benchmarks.qat_step_ratio(
            TINY, image_size=16, batch_size=4, threads=1, warmup=1, iters=2
        ),
        "ddp_scaling_ratio": benchmarks.ddp_scaling_ratio(
            model_name=TINY, ranks=2, image_size=16, global_batch=8, rounds=1, warmup=1, steps=2
        ),
        "data_wait_fraction": benchmarks.data_wait_fraction(
            model_name=TINY, image_size=16, demo_per_class=2, shard_size=5, warmup=1, steps=3
        ),
    }


def test_cheap_figures_are_positive_finite_ratios(figures):
    assert _positive_finite(figures["qat_step_ratio"]["ratio"])
    ddp = figures["ddp_scaling_ratio"]
    assert _positive_finite(ddp["ratio"])
    assert _positive_finite(ddp["multi_images_per_s"])
    assert _positive_finite(ddp["single_images_per_s"])
    assert 0 <= figures["data_wait_fraction"]["fraction"] < 1


# convert_pt2e alone takes tens of seconds even on this tiny net (torchao 0.18): slow tests.
@pytest.mark.slow
def test_int8_speedup_compiles_and_measures_tiny_net():
    result = benchmarks.int8_speedup(
        TINY, image_size=16, batch_size=4, threads=1, calib_batches=1, iters=2
    )
    assert _positive_finite(result["ratio"])


def _graph_signature(graph_module: torch.fx.GraphModule) -> list[tuple]:
    """Each node's op, target and arguments, nodes named by position (the two flows name them
    differently): the q/dq nodes carry the activation scales and zero points as plain floats
    and ints, so equal signatures mean equal qparams too."""
    nodes = list(graph_module.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    return [
        (n.op, str(n.target), str(torch.fx.node.map_arg(n.args, lambda a: f"%{position[a]}")))
        for n in nodes
    ]


@pytest.mark.slow
def test_dynamic_activation_int8_converts_and_runs_every_linear_int8():
    """The recipe docs/coverage.md measures dynamic QAT with (convert the prepared model
    itself, in train mode) converts: every linear of the tiny ViT is an int8 kernel with
    activation qparams chosen at run time, and compiled matches converted to rounding."""
    from benchmarks.dynamic_activations import int8_variant
    from qatdist.models import tiny_vit

    torch.manual_seed(0)
    fp32 = tiny_vit(num_classes=10).eval()
    torch.nn.init.normal_(fp32.heads.head.weight, std=0.02)  # torchvision starts it at zero
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(3)]
    converted, compiled, counts = int8_variant(fp32, 32, True, calibration)
    assert counts["linear"] == 9
    assert any("choose_qparams" in str(n.target) for n in converted.graph.nodes)
    with torch.no_grad():
        reference = converted(calibration[0])
        difference = (compiled(calibration[0]) - reference).abs().max()
    assert reference.abs().max() > 0
    # Rounding-level on the logits' scale: the default target ("auto") quantizes weights so
    # that this CPU's int8 sums are exact (qatdist.quant.target).
    assert difference <= 0.05 * reference.abs().max()


@pytest.mark.int8_numeric
def test_hand_flow_has_the_same_weights_and_predictions():
    example = torch.randn(4, 3, 16, 16)
    ours, hand = benchmarks.same_weights_int8_pair(TINY, example, calib_batches=1)
    # Exact where the conversion is deterministic: the int8 weights, their per-channel qparams
    # (the state dict) and the graph with its activation qparams.
    ours_state, hand_state = ours.state_dict(), hand.state_dict()
    assert ours_state.keys() == hand_state.keys()
    assert all(torch.equal(ours_state[k], hand_state[k]) for k in ours_state)
    assert _graph_signature(ours) == _graph_signature(hand)
    # Loose on the outputs: they come from the CPU's fp32 kernels, whose rounding differs by
    # vendor and ISA, and one flipped activation rounding moves a logit by about a quant step.
    with torch.no_grad():
        ours_logits, hand_logits = ours(example), hand(example)
    scale = float(hand_logits.abs().max())
    torch.testing.assert_close(ours_logits, hand_logits, rtol=0, atol=0.05 * scale)


def _load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_script_writes_exactly_the_contract_keys(figures, monkeypatch, tmp_path, capsys):
    """The script's plumbing: the cheap figures are the tiny measurements, the two compiled
    ones stand-ins (they are tested above, marked slow)."""
    data_fraction = figures["data_wait_fraction"]
    monkeypatch.setattr(benchmarks, "qat_step_ratio", lambda *a, **k: figures["qat_step_ratio"])
    monkeypatch.setattr(benchmarks, "ddp_scaling_ratio", lambda **k: figures["ddp_scaling_ratio"])
    int8 = {
        "model": TINY,
        "shape": [4, 3, 16, 16],
        "threads": 1,
        "iters": 2,
        "fp32_ms": 2.0,
        "int8_ms": 1.0,
        "compile_s": {"int8": 0.0, "fp32": 0.0},
        "ratio": 2.0,
    }
    monkeypatch.setattr(benchmarks, "int8_speedup", lambda *a, **k: int8)
    monkeypatch.setattr(benchmarks, "data_wait_fraction", lambda **k: data_fraction)
    hand = {
        "model": TINY,
        "shape": [4, 3, 16, 16],
        "threads": 1,
        "iters": 2,
        "qatdist_ms": 1.0,
        "hand_ms": 1.0,
        "compile_s": {"qatdist": 0.0, "hand": 0.0},
        "top1_agreement": 1.0,
        "agreement_comparable": 3,
        "ratio": 1.0,
    }
    monkeypatch.setattr(benchmarks, "final_model_vs_hand_flow", lambda **k: hand)
    out = tmp_path / "bench.json"
    script = _load_script(monkeypatch)
    assert script.main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert tuple(results) == script.JSON_KEYS + script.REFERENCE_KEYS
    assert list(results["qat_step_ratio_torchao_op"]) == ["resnet18"]
    assert list(results["qat_step_ratio_unfused_weight_scaling"]) == ["resnet18"]
    assert _positive_finite(results["ddp_scaling_ratio_bf16_grads"])
    assert list(results["qat_step_ratio"]) == ["resnet18"]
    assert list(results["int8_speedup"]) == ["resnet18"]
    for key in ("ddp_scaling_ratio", "int8_speedup_geomean", "final_model_vs_hand_flow"):
        assert _positive_finite(results[key])
    assert 0 <= results["data_wait_fraction"] < 1
    assert all(_positive_finite(v) for v in results["qat_step_ratio"].values())
    assert all(_positive_finite(v) for v in results["int8_speedup"].values())
    printed = capsys.readouterr().out
    assert "| figure | measured | target |" in printed
    assert "not measured" in printed  # --quick leaves mobilenet_v3_large's step ratio out
    assert "top-1 agreement 1.000 of 3 decided samples" in printed


def test_summary_judges_each_figure_against_its_target(monkeypatch):
    script = _load_script(monkeypatch)
    results = {
        "qat_step_ratio": {"resnet18": 1.10, "mobilenet_v3_large": 1.30},
        "int8_speedup": {"resnet18": 2.5},
        "data_wait_fraction": 0.02,
    }
    rows = {row[0]: row for row in script.summary_rows(results, {"int8_speedup": ["resnet50"]})}
    assert rows["qat_step_ratio resnet18"] == ("qat_step_ratio resnet18", "1.100", "<= 1.15", "met")
    assert rows["qat_step_ratio mobilenet_v3_large"][3] == "NOT met"
    assert rows["int8_speedup resnet18"][3] == "met"
    assert rows["int8_speedup resnet50"][1:] == ("not measured", ">= 2.0", "-")
    assert rows["data_wait_fraction"][3] == "NOT met"  # the target is strict: < 0.02
    assert rows["ddp_scaling_ratio"][1] == "not measured"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [alias.name for alias in node.names]))
    return found


def test_benchmarks_use_only_public_qatdist_names():
    """The library does not import the benchmarks, and the benchmarks import no private
    (underscore) module or name of qatdist."""
    for path in (ROOT / "qatdist").rglob("*.py"):
        assert all(module.split(".")[0] != "benchmarks" for module, _ in _imports(path)), path
    checked = 0
    for path in (ROOT / "benchmarks").glob("*.py"):
        for module, names in _imports(path):
            if module.split(".")[0] == "qatdist":
                checked += 1
                private = [n for n in module.split(".") + names if n.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"
    assert checked > 0
