"""The whole distributed QAT run, for real: 2 ranks over gloo, final convert/compile/save."""

import subprocess
import sys
import textwrap

import pytest

REPORT_KEYS = {
    "model",
    "world_size",
    "global_batch_size",
    "steps",
    "train_images_per_s",
    "fp32_fake_quant_top1",
    "int8_top1",
    "int8_latency_ms",
    "fp32_latency_ms",
    "int8_speedup",
    "latency_batch_size",
    "torch_version",
    "torchao_version",
}


@pytest.fixture(scope="module")
def run(two_rank_run):
    result = two_rank_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return two_rank_run


def test_exit_zero_and_report(run):
    report = run["report"]
    assert REPORT_KEYS <= set(report)
    assert report["world_size"] == 2
    assert report["global_batch_size"] == 16
    assert report["steps"] == 8
    assert report["train_images_per_s"] > 0
    for key in ("fp32_fake_quant_top1", "int8_top1"):
        assert 0.0 <= report[key] <= 1.0
    assert report["int8_latency_ms"] > 0 and report["fp32_latency_ms"] > 0
    assert report["int8_speedup"] == pytest.approx(
        report["fp32_latency_ms"] / report["int8_latency_ms"]
    )
    assert report["int8_slower_than_fp32"] is (report["int8_speedup"] < 1)
    assert report["quantization_complete"] is True and report["unquantized_layers"] == []
    assert isinstance(report["cpu_int8_capabilities"], dict)


def test_report_has_the_baselines(run):
    report = run["report"]
    for key in ("fp32_top1", "ptq_int8_top1", "int8_top1"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["qat_gain_over_ptq"] == pytest.approx(
        report["int8_top1"] - report["ptq_int8_top1"]
    )
    assert report["int8_drop_vs_fp32"] == pytest.approx(report["fp32_top1"] - report["int8_top1"])
    assert "start_fp32_top1" not in report  # no model.weights: nothing was given
    table = run["result"].stdout + run["result"].stderr
    assert "PTQ int8 (no QAT)" in table and "QAT gain over PTQ" in table


def test_distillation_teacher_ran(run):
    report = run["report"]
    assert report["teacher_seconds_total"] > 0
    assert report["skipped_nonfinite_steps"] == 0 and report["rank_skipped_nonfinite_steps"] == [
        0,
        0,
    ]


def test_report_names_the_task_and_the_compiled_agreements_scale(run):
    report = run["report"]
    assert (report["task"], report["metric"], report["higher_is_better"]) == (
        "classification",
        "top1",
        True,
    )
    assert report["int8_compiled_output_scale"] > 0
    assert report["int8_compiled_max_abs_logit_diff"] >= 0
    assert {"fake_quant_top1", "int8_top1"} <= set(report["eval_history"][-1])


def test_report_keys_are_registered(run):
    from qatdist.run.report import REPORT_KEYS, report_fields

    assert set(run["report"]) <= set(REPORT_KEYS)
    report_fields(**run["report"])  # every value has its registered type


def test_final_weights_identical_on_both_ranks(run):
    hashes = run["report"]["rank_state_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


def test_resolved_config_written(run):
    from qatdist import config

    cfg = config.from_dict(
        __import__("tomllib").loads((run["out_dir"] / "resolved_config.toml").read_text())
    )
    assert cfg.run.out_dir == str(run["out_dir"])
    assert cfg.train.steps_per_epoch == 4


def test_console_progress_from_rank0_only(run):
    out = run["result"].stdout
    assert "step 2/8" in out and "img/s" in out and "eta" in out
    assert out.count("step 8/8") == 1


def test_saved_pt2_loads_in_fresh_process_and_matches(run):
    final = run["out_dir"] / "final"
    script = textwrap.dedent(f"""
        import torch, torchao  # torchao registers the quantized ops
        ep = torch.export.load({str(final / "model_int8.pt2")!r})
        ref = torch.load({str(final / "reference_io.pt")!r}, weights_only=True)
        out = ep.module()(ref["input"])
        print((out - ref["logits"]).abs().max().item())
        small = ep.module()(ref["input"][:3])
        print(tuple(small.shape))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    max_diff, shape = result.stdout.strip().splitlines()[-2:]
    assert float(max_diff) < 1e-4
    assert shape == "(3, 10)"
