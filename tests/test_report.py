"""The report's key registry and views, margin-aware agreement, and the quantization-coverage
check of the final step (on the tiny CNN, eager: no Inductor compile)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_model import tiny_cnn  # tests/ is on sys.path (pytest's rootdir conftest)

from qatdist.config import DataConfig, QuantConfig
from qatdist.finish import checks
from qatdist.finish import finalize as fin
from qatdist.quant import QatModel
from qatdist.quant import inspect as quant_inspect
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.schedule import to_eval
from qatdist.run import report as reports
from qatdist.tasks.classification import (
    Classification,
    DecidedAgreement,
    agreement_where_decided,
    top2_margin,
)

# --- margin-aware agreement -------------------------------------------------------------------


def test_near_ties_are_not_comparable_and_decided_flips_count():
    ref = torch.tensor([[2.0, 1.99, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    other = ref.clone()
    other[0, 1] += 0.02  # a near tie flips: the reference never decided it
    assert agreement_where_decided(ref, other) == (3, 3)
    other[3] = torch.tensor([0.0, 0.9, 0.0])  # a decided sample flips: max diff 1.0 now
    agree, comparable = agreement_where_decided(ref, other)
    # Only margins above the measured difference (1.0) count: sample 1 (margin 3.0) agrees.
    assert (agree, comparable) == (1, 1)
    torch.testing.assert_close(top2_margin(ref), torch.tensor([0.01, 3.0, 0.5, 1.0]))


def test_meter_judges_with_the_max_difference_over_all_batches():
    meter = DecidedAgreement()
    meter.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))  # margin 1, diff 0
    meter.update(torch.tensor([[0.0, 5.0]]), torch.tensor([[0.0, 3.5]]))  # margin 5, diff 1.5
    assert meter.max_abs_diff == pytest.approx(1.5)
    assert meter.counts() == (1, 1)  # the first sample's margin 1 < 1.5: not comparable
    assert meter.result() == {
        "agreement": 1.0,
        "comparable": 1,
        "max_abs_diff": pytest.approx(1.5),
        "output_scale": 5.0,  # the reference's largest |logit|
    }
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.zeros(2, 3), torch.zeros(2, 4))


# --- the registry ------------------------------------------------------------------------------

ISSUE_KEYS = [
    "fp32_top1",
    "ptq_int8_top1",
    "start_fp32_top1",
    "qat_gain_over_ptq",
    "int8_drop_vs_fp32",
    "skipped_nonfinite_steps",
    "quantization_complete",
    "unquantized_layers",
    "int8_slower_than_fp32",
    "cpu_int8_capabilities",
    "accuracy_budget",
    "accuracy_budget_met",
    "fp32_fallback_layers",
    "sensitivity",
    "teacher_seconds_total",
    "int8_compiled_comparable_samples",
    "int8_compiled_output_scale",
    "task",
    "metric",
    "int8_aoti_comparable_samples",
]


def test_registry_documents_every_key_once():
    assert set(ISSUE_KEYS) <= set(reports.REPORT_KEYS)
    names = [key.name for key in reports.REPORT_KEYS.values()]
    assert len(names) == len(set(names))
    assert all(key.meaning and key.type for key in reports.REPORT_KEYS.values())
    table = reports.keys_markdown()
    assert all(f"`{name}`" in table for name in names)
    assert "`fp32_top1`" in reports.report_fields.__doc__


def test_builder_refuses_unknown_keys_and_wrong_types():
    assert reports.report_fields(int8_top1=0.5, steps=3) == {"int8_top1": 0.5, "steps": 3}
    with pytest.raises(KeyError, match="int8_top_1"):
        reports.report_fields(int8_top_1=0.5)
    with pytest.raises(TypeError, match="steps"):
        reports.report_fields(steps=3.5)
    with pytest.raises(TypeError, match="quantization_complete"):
        reports.report_fields(quantization_complete=1)
    with pytest.raises(KeyError, match="no_such_key"):
        reports.field({}, "no_such_key")


def test_derived_keys_need_their_inputs():
    assert "qat_gain_over_ptq" not in reports.with_derived({"int8_top1": 0.7})
    report = reports.with_derived(
        {"int8_top1": 0.7, "ptq_int8_top1": 0.6, "fp32_top1": 0.75, "int8_speedup": 0.8}
    )
    assert report["qat_gain_over_ptq"] == pytest.approx(0.1)
    assert report["int8_drop_vs_fp32"] == pytest.approx(0.05)
    assert report["int8_slower_than_fp32"] is True
    budget = reports.with_derived({"int8_top1": 0.7, "fp32_top1": 0.75, "accuracy_budget": 0.01})
    assert budget["accuracy_budget_met"] is False


def test_a_task_metric_is_accepted_only_under_the_reports_metric():
    fields = {"metric": "mse", "higher_is_better": False, "int8_mse": 0.2, "fp32_mse": 0.15}
    assert reports.report_fields(**fields)["int8_mse"] == 0.2
    with pytest.raises(KeyError, match="int8_mse"):
        reports.report_fields(int8_mse=0.2)  # no metric named: not a report key
    with pytest.raises(TypeError, match="int8_mse"):
        reports.report_fields(metric="mse", int8_mse="low")
    derived = reports.with_derived(fields | {"ptq_int8_mse": 0.5, "accuracy_budget": 0.01})
    # lower is better: int8 is 0.3 better than PTQ and 0.05 worse than fp32
    assert derived["qat_gain_over_ptq"] == pytest.approx(0.3)
    assert derived["int8_drop_vs_fp32"] == pytest.approx(0.05)
    assert derived["accuracy_budget_met"] is False
    text = reports.markdown(derived | {"latency": []})
    assert "## Baselines (mse)" in text and "| PTQ int8 (no QAT) | 0.5000 |" in text
    assert "| int8 compiled (Inductor, freezing) | 0.2000 |" in text


def test_markdown_has_baselines_only_when_measured():
    plain = {"model": "m", "int8_top1": 0.5, "latency": []}
    assert "Baselines" not in reports.markdown(plain)
    full = reports.with_derived(plain | {"fp32_top1": 0.6, "ptq_int8_top1": 0.45})
    text = reports.markdown(full)
    assert "## Baselines (top-1)" in text
    assert "| PTQ int8 (no QAT) | 0.4500 |" in text
    assert "| QAT gain over PTQ | +0.0500 |" in text
    assert "| int8 drop vs fp32 | +0.1000 |" in text


def test_latency_png_is_drawn(tmp_path):
    from PIL import Image

    path = tmp_path / "latency.png"
    reports.latency_png(
        path, [1, 4, 32], {"fp32 compiled": [1.0, 3.0, 20.0], "int8 compiled": [0.5, 1.0, 6.0]}
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (720, 460)
    reports.latency_png(tmp_path / "one.png", [8], {"fp32": [2.0], "int8": [1.0]})  # one point
    assert (tmp_path / "one.png").stat().st_size > 1000


def test_slower_int8_names_the_checkable_causes():
    report = {
        "cpu_int8_capabilities": {"int8_dot_product": False},
        "latency_batch_size": 1,
        "threads": 1,
        "unquantized_layers": ["layer4.1.conv2"],
        "compiled": True,
    }
    causes = " | ".join(checks.slower_int8_causes(report))
    for phrase in ("dot-product", "batch size 1", "one torch thread", "layer4.1.conv2"):
        assert phrase in causes
    fine = {"cpu_int8_capabilities": {"int8_dot_product": True}, "latency_batch_size": 64}
    assert checks.slower_int8_causes(fine | {"threads": 8, "compiled": True}) == []


# --- quantization coverage ------------------------------------------------------------------


def _prepared(cfg: QuantConfig) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    prepared = QatModel.from_fp32(tiny_cnn(10), cfg, image_size=16).prepared
    prepared(torch.randn(8, 3, 16, 16))  # observe once: qparams for convert
    to_eval(prepared)
    return prepared


def _drop_weight_quantization(converted: torch.fx.GraphModule, layer: str) -> None:
    """Feed `layer`'s conv a float weight in place of its dequantized int8 one."""
    graph = converted.graph
    for node in graph.nodes:
        if node.op == "call_function" and quant_inspect._module_path(node) == layer:
            dequant = node.args[1]
            if "dequantize" not in str(dequant.target):
                continue
            args = torch.fx.node.map_arg(dequant.args, lambda n: getattr(converted, n.target))
            converted.register_buffer("float_weight", dequant.target(*args))
            with graph.inserting_before(node):
                node.replace_input_with(dequant, graph.get_attr("float_weight"))
    graph.eliminate_dead_code()
    converted.recompile()


def _finalize(prepared, out_dir, **kwargs) -> dict:
    images, labels = torch.randn(6, 3, 16, 16), torch.arange(6) % 10
    return fin.finalize(
        prepared,
        tiny_cnn(10),
        Classification(DataConfig(image_size=16)),
        lambda bs: [(images, labels)],
        image_size=16,
        batch_sizes=[2],
        latency_iters=1,
        out_dir=out_dir,
        compile_model=False,
        **kwargs,
    )


@pytest.fixture
def layer_left_in_float(monkeypatch):
    def convert_leaving_layer_2(prepared):
        converted = convert_to_int8(prepared)
        _drop_weight_quantization(converted, "2")
        return converted

    monkeypatch.setattr(fin, "convert_to_int8", convert_leaving_layer_2)


def test_layer_left_in_float_is_reported(layer_left_in_float, tmp_path):
    report = _finalize(_prepared(QuantConfig()), tmp_path / "final")
    assert report["quantization_complete"] is False
    assert report["unquantized_layers"] == ["2"]
    assert report["annotated_conv_layers"] == 2 and report["annotated_linear_layers"] == 1
    saved = json.loads((tmp_path / "final" / "report.json").read_text())
    assert saved["unquantized_layers"] == ["2"]
    assert "left in float: 2" in (tmp_path / "final" / "report.md").read_text()


def test_layer_left_in_float_is_an_error_when_full_quantization_is_required(
    layer_left_in_float, tmp_path
):
    out = tmp_path / "final"
    with pytest.raises(fin.QuantizationIncomplete, match="left in float: 2"):
        _finalize(_prepared(QuantConfig()), out, require_full_quantization=True)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_layers_kept_fp32_by_config_are_not_a_shortfall(tmp_path):
    prepared = _prepared(QuantConfig(fp32_module_names=["2"]))
    report = _finalize(prepared, tmp_path / "final", require_full_quantization=True)
    assert report["quantization_complete"] is True and report["unquantized_layers"] == []
    assert report["annotated_conv_layers"] == 1
    assert report["int8_eval_samples"] == 6
    assert 0 <= report["int8_compiled_comparable_samples"] <= 6
    assert (report["task"], report["metric"]) == ("classification", "top1")
    assert (
        report["int8_compiled_output_scale"] > 0 and report["int8_compiled_max_abs_logit_diff"] >= 0
    )
    assert 0 <= report["int8_top1"] <= 1 and 0 <= report["int8_reference_top1"] <= 1


def test_generated_code_shortfall_without_a_float_layer_is_counted():
    prepared = _prepared(QuantConfig())
    int8 = convert_to_int8(prepared)
    fields = checks.coverage(prepared, int8, {"inductor": {"conv": 1, "linear": 1}})
    assert fields["quantization_complete"] is False
    assert fields["unquantized_layers"] == ["1 conv layer(s) not lowered to int8 in inductor"]
    assert checks.coverage(prepared, int8, {"inductor": {"conv": 2, "linear": 1}})[
        "quantization_complete"
    ]
