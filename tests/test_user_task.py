"""A user's own task from a .py file (tests/colour_task.py: regress the mean colour, metric
colour_mae, lower is better) trains on 2 real gloo ranks; its metric reaches the report, the
accuracy budget and the console's baselines table under its own name."""

from __future__ import annotations

import json
import re

import pytest

from qatdist.config import ConfigError, DataConfig, TaskConfig
from qatdist.tasks import build_task

TASK = "tests/colour_task.py:build"  # by path, relative to the repository root (the cwd)


@pytest.fixture(scope="module")
def colour_run(tiny_shards, tmp_path_factory) -> dict:
    from conftest import ROOT, tiny_run_args, torchrun

    out_dir = tmp_path_factory.mktemp("colour_run")
    args = tiny_run_args(
        tiny_shards,
        out_dir,
        f"--task.name={TASK}",
        "--model.name=tests.tiny_model:tiny_cnn",
        "--data.num_classes=3",
        "--train.distill_weight=0.3",  # the task's distill_loss
        "--runtime.compile_final=false",
        "--quant.max_accuracy_drop=0.0",
        "--quant.sensitivity_candidates=1",
    )
    result = torchrun(args, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((out_dir / "final" / "report.json").read_text())
    return {"result": result, "out_dir": out_dir, "report": report}


def test_the_tasks_metric_reaches_the_report_under_its_own_name(colour_run):
    report = colour_run["report"]
    assert (report["task"], report["metric"], report["higher_is_better"]) == (
        "mean_colour",
        "colour_mae",
        False,
    )
    for baseline in ("fp32", "ptq_int8", "ptq_fp32", "fp32_fake_quant", "int8", "int8_reference"):
        assert report[f"{baseline}_colour_mae"] >= 0, baseline
    assert not [key for key in report if key.endswith("top1")]
    # lower is better: the drop and the gain are signed so that positive is worse / better
    assert report["int8_drop_vs_fp32"] == pytest.approx(
        report["int8_colour_mae"] - report["fp32_colour_mae"]
    )
    assert report["qat_gain_over_ptq"] == pytest.approx(
        report["ptq_int8_colour_mae"] - report["int8_colour_mae"]
    )
    history = report["eval_history"][-1]
    assert {"fake_quant_colour_mae", "int8_colour_mae"} <= set(history)
    # the task's agreement rule, with the difference and the scale it is judged against
    assert report["int8_compiled_comparable_samples"] == report["int8_eval_samples"] == 40
    assert report["int8_compiled_output_scale"] > 0
    assert report["int8_compiled_max_abs_logit_diff"] >= 0


def test_the_accuracy_budget_reads_the_tasks_metric(colour_run):
    report, out = colour_run["report"], colour_run["result"].stdout
    assert report["accuracy_budget"] == 0.0
    assert report["accuracy_budget_met"] == (report["int8_drop_vs_fp32"] <= 0.0)
    rows = report["sensitivity"]
    assert rows and all(
        set(row) == {"layer", "sqnr_db", "colour_mae_gain_when_float", "latency_cost_ms"}
        for row in rows
    )
    searched = sum(report["budget_candidates_per_rank"])
    measured = [row for row in rows if row["colour_mae_gain_when_float"] is not None]
    assert len(measured) == searched  # a candidate was measured only if the budget was missed
    assert "Accuracy budget 0.0000 (fp32 - int8 colour_mae)" in out


def test_the_console_table_and_tensorboard_show_the_tasks_metric(colour_run):
    out = colour_run["result"].stdout
    assert "baselines (colour_mae on the validation shards):" in out
    fp32 = colour_run["report"]["fp32_colour_mae"]
    assert re.search(rf"fp32, final weights +{fp32:.4f}\n", out)
    assert "int8 drop vs fp32" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(colour_run["out_dir"] / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/colour_mae", "eval/int8_colour_mae", "final/int8_colour_mae"} <= tags
    report_md = (colour_run["out_dir"] / "final" / "report.md").read_text()
    assert "## Baselines (colour_mae)" in report_md


def test_a_task_function_that_fails_or_returns_no_task_names_task_name(tmp_path):
    data_cfg = DataConfig(num_classes=10)
    with pytest.raises(ConfigError, match=r"^task.name: .*ValueError: the model must have 3"):
        build_task(TaskConfig(name=TASK), data_cfg)
    other = tmp_path / "not_a_task.py"
    other.write_text("def build(task_cfg, data_cfg):\n    return 42\n")
    with pytest.raises(ConfigError, match="returned a int, not a qatdist.tasks.Task"):
        build_task(TaskConfig(name=f"{other}:build"), data_cfg)
    with pytest.raises(ConfigError, match="task.name: cannot load factory"):
        build_task(TaskConfig(name=f"{other}:missing"), data_cfg)
