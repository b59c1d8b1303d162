"""The final report: every `report.json` key defined once, and its views (`report.md`,
`latency.png`, the console's baselines table).

`REPORT_KEYS` names each key with its type and meaning. Writers build the dict with
`report_fields(...)` (an unknown key or a value of the wrong type is an error naming it) and
`with_derived(...)`; readers go through `field(report, name)`, which refuses unregistered names.
`keys_markdown()` renders the registry for the README / docs.

The task's primary metric `<m>` (the report's `metric`; classification: `top1`) is written as
`<baseline>_<m>` for each of `METRIC_BASELINES`: classification's `*_top1` keys are registered
by name; another task's are accepted when the report's `metric` names them, and read with
`metric_field(report, baseline)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReportKey:
    name: str
    type: str  # "float", "int | None", "list[str]", ...: checked by `report_fields`
    meaning: str


# What each `<baseline>_<metric>` key measures (the task's primary metric on the val shards).
METRIC_BASELINES = {
    "start_fp32": "the model of `model.weights` as given, before any step",
    "fp32": "final weights in float: fake quant and observers off, BN in eval",
    "ptq_int8": "post-training int8 of the float model at fake_quant_start_step",
    "ptq_fp32": "the float model that the PTQ baseline quantized, in float",
    "fp32_fake_quant": "final prepared QAT model (fake quant as trained)",
    "int8": "converted int8 model compiled by Inductor (eager when not compiled)",
    "int8_reference": "converted int8 model, eager q/dq reference graph",
    "int8_aoti": "int8 AOTInductor package",
    "int8_openvino": "int8 OpenVINO IR (export_final --formats openvino)",
}
CLASSIFICATION_METRIC = "top1"


def metric_key(baseline: str, metric: str) -> str:
    """The report key of `baseline`'s value of the task's primary `metric` (e.g. int8_top1)."""
    if baseline not in METRIC_BASELINES:
        raise KeyError(f"{baseline!r} is not one of the report's metric baselines")
    return f"{baseline}_{metric}"


_KEYS = [
    # The run
    ("model", "str", "model.name: torchvision model name or factory"),
    ("task", "str", "task.name: what the model predicts (classification, or a user task)"),
    ("metric", "str", "the task's primary metric, the <m> of every <baseline>_<m> key"),
    ("higher_is_better", "bool", "whether a larger primary metric is better"),
    (
        "weights_source",
        "dict | None",
        "model.weights as loaded: file, sha256, nesting_key (the checkpoint key the state dict "
        "sat under, null: top level), prefix_stripped (e.g. 'module.', null: none); null "
        "without model.weights",
    ),
    ("world_size", "int", "ranks that trained"),
    ("global_batch_size", "int", "images per optimizer step over all ranks"),
    ("steps", "int", "optimizer steps of the final weights"),
    ("epochs", "int", "configured epochs"),
    ("checkpoint", "str | None", "checkpoint folder exported (export_final only)"),
    ("run_dir", "str", "run folder exported (export_final only)"),
    (
        "training_only_ops",
        "list[str]",
        "random training-only ops left out of the QAT graph so that evaluation and int8 compute "
        "the eager eval model (qatdist/quant/fixes/training_only.py)",
    ),
    ("produced_by", "str", "the command that wrote the report when not the trainer"),
    ("resumed_from_step", "int | None", "step this process resumed from, null if it did not"),
    ("train_images_per_s", "float", "training throughput of the steps this process ran"),
    (
        "train_images",
        "int",
        "images this process's steps trained (steps since start or resume x global batch): "
        "what train_images_per_s divides by the training time",
    ),
    ("skipped_samples", "int", "bad samples skipped over all ranks (data.on_error='skip')"),
    ("skipped_nonfinite_steps", "int", "optimizer steps skipped for a non-finite loss/grad"),
    ("rank_skipped_nonfinite_steps", "list[int]", "skipped_nonfinite_steps as each rank counted"),
    ("teacher_seconds_total", "float", "time spent in the distillation teacher's forward"),
    (
        "fake_quant_op",
        "str | None",
        "what computed the fake quants in training: 'qatdist_cpp' (qatdist's C++ ops) or "
        "'torchao' (torchao's op: quant.fast_fake_quant = false, or no C++ compiler); null: none",
    ),
    (
        "teacher_weights_source",
        "dict | None",
        "train.distill_teacher_weights as loaded, the same fields as weights_source; null: the "
        "teacher is the model as built (or no distillation)",
    ),
    ("eval_history", "list[dict]", "every evaluation during training, in step order"),
    # Accuracy: baselines and the int8 model (classification: top-1 in [0, 1] on the
    # validation shards; another task writes <baseline>_<its metric> alike)
    *(
        (metric_key(baseline, CLASSIFICATION_METRIC), "float", meaning)
        for baseline, meaning in METRIC_BASELINES.items()
    ),
    (
        "qat_gain_over_ptq",
        "float",
        "int8 - PTQ int8 value of the primary metric (int8_top1 - ptq_int8_top1), signed so that "
        "positive is better: what QAT bought over PTQ",
    ),
    (
        "int8_drop_vs_fp32",
        "float",
        "fp32 - int8 value of the primary metric (fp32_top1 - int8_top1), signed so that "
        "positive is worse: what quantization costs",
    ),
    ("int8_eval_samples", "int", "validation samples behind the int8 metric and agreements"),
    (
        "int8_compiled_agreement",
        "float | None",
        "agreement of the compiled int8 model's predictions with the eager reference's over the "
        "comparable ones, by the task's rule (classification: top-1 where the reference's top-2 "
        "logit margin exceeds int8_compiled_max_abs_logit_diff); null when none is comparable",
    ),
    ("int8_compiled_comparable_samples", "int", "predictions the agreement could judge"),
    (
        "int8_compiled_max_abs_logit_diff",
        "float",
        "max |difference| of the task's predictions (classification: logits), compiled vs "
        "reference",
    ),
    (
        "int8_compiled_output_scale",
        "float",
        "max |value| of the reference's predictions: the scale int8_compiled_max_abs_logit_diff "
        "is judged against",
    ),
    ("int8_aoti_agreement", "float | None", "as int8_compiled_agreement, for the AOTI package"),
    ("int8_aoti_comparable_samples", "int", "as int8_compiled_comparable_samples, for AOTI"),
    ("int8_aoti_max_abs_logit_diff", "float", "max |prediction difference|, AOTI vs reference"),
    ("int8_aoti_output_scale", "float", "as int8_compiled_output_scale, for AOTI"),
    ("int8_openvino_agreement", "float | None", "as int8_compiled_agreement, for OpenVINO"),
    ("int8_openvino_comparable_samples", "int", "as int8_compiled_comparable_samples, OpenVINO"),
    (
        "int8_openvino_max_abs_logit_diff",
        "float",
        "max |prediction difference|, OpenVINO vs reference",
    ),
    ("int8_openvino_output_scale", "float", "as int8_compiled_output_scale, for OpenVINO"),
    (
        "openvino_int8_kernels",
        "list[int]",
        "[int8, all] convolution/fully-connected layers in OpenVINO's runtime model",
    ),
    (
        "accuracy_budget",
        "float",
        "quant.max_accuracy_drop the run had to meet, in the primary metric (-1 = off)",
    ),
    ("accuracy_budget_met", "bool", "int8_drop_vs_fp32 <= accuracy_budget"),
    ("fp32_fallback_layers", "list[str]", "layers moved to fp32 to meet the accuracy budget"),
    (
        "sensitivity",
        "list[dict]",
        "per quantized layer, lowest SQNR first: layer, sqnr_db (error it adds in int8), "
        "<metric>_gain_when_float (e.g. top1_gain_when_float; signed so that positive is "
        "better) and latency_cost_ms (null when not a measured candidate)",
    ),
    ("budget_candidates_per_rank", "list[int]", "budget-search candidates each rank evaluated"),
    # Quantization coverage
    ("fp32_conv_layers", "int", "convolution modules of the fp32 model"),
    ("fp32_linear_layers", "int", "linear modules of the fp32 model"),
    ("annotated_conv_layers", "int", "convolutions the quantizer annotated (fp32-kept excluded)"),
    ("annotated_linear_layers", "int", "linears the quantizer annotated (fp32-kept excluded)"),
    ("quantized_ops", "dict", "quantized conv/linear calls per lowered code: inductor, aoti"),
    (
        "int8_metric_values",
        "dict",
        "every value of the task's metric for the int8 model, where the task has more than the "
        "primary one (segmentation: miou, pixel_accuracy, iou_<class>)",
    ),
    (
        "int8_reference_metric_values",
        "dict",
        "as int8_metric_values, for the converted int8 reference graph",
    ),
    *(
        (f"{baseline}_metric_values", "dict", f"as int8_metric_values, for {baseline}_<metric>")
        for baseline in ("fp32", "ptq_int8", "ptq_fp32", "start_fp32")
    ),
    ("quantized_conv_count", "int | None", "quantized convolutions in Inductor's code"),
    ("quantized_linear_count", "int | None", "quantized linears in Inductor's code"),
    ("quantization_complete", "bool", "every annotated conv/linear runs an int8 kernel"),
    ("unquantized_layers", "list[str]", "annotated layers left in float by the lowering"),
    (
        "constant_layers",
        "list[str]",
        "conv/linear layers computed from parameters only (swin_v2's position-bias MLP): kept "
        "fp32, folded to constants by freezing, not counted as left in float",
    ),
    # Latency
    ("int8_latency_ms", "float", "median ms per batch of the int8 model at latency_batch_size"),
    ("fp32_latency_ms", "float", "median ms per batch of the fp32 model at latency_batch_size"),
    ("int8_speedup", "float", "fp32_latency_ms / int8_latency_ms"),
    ("int8_slower_than_fp32", "bool", "int8_speedup < 1"),
    ("int8_slower_causes", "list[str]", "checked likely causes when int8 is slower"),
    ("latency_batch_size", "int", "batch size of the single-batch latency fields (largest)"),
    ("latency_iters", "int", "timed iterations per model and batch size"),
    (
        "latency",
        "list[dict]",
        "per batch size: <model>_ms, <model>_images_per_s, speedups, fastest_int8 (the int8 "
        "artifact with the lowest latency: int8 compiled, int8_aoti or int8_openvino)",
    ),
    ("compiled", "bool", "models compiled by Inductor (false: eager)"),
    ("compile_seconds", "float", "Inductor compile time of int8 and fp32"),
    ("aoti_build_seconds", "float", "AOTInductor package build time"),
    ("openvino_export_seconds", "float", "OpenVINO IR convert, save and compile time"),
    ("formats", "list[str]", "artifact formats written (export_final --formats)"),
    # Distributed state
    ("observer_sync_max_divergence_before", "float", "max relative qparam divergence pre-sync"),
    ("observer_sync_max_divergence_after", "float", "the same after the final sync (0 = equal)"),
    ("observer_sync_seconds_total", "float", "time spent syncing statistics"),
    ("final_state_sha256", "str", "hash of rank 0's final model state"),
    ("rank_state_sha256", "list[str]", "hash of each rank's final model state"),
    ("rank_steps", "list[int]", "steps each rank ran"),
    # Machine
    ("cpu_model", "str", "CPU model name from /proc/cpuinfo"),
    ("cpu_int8_capabilities", "dict", "int8 dot-product ISA: avx512_vnni, avx_vnni, amx_int8"),
    (
        "int8_target",
        "str | None",
        "quant.target the int8 model was built for, read from its weights' range: 'avx2' "
        "(-64..63, exact without int8 dot products) or 'vnni' (-128..127); null: no int8 weight",
    ),
    ("threads", "int", "torch threads of the final measurements"),
    ("torch_version", "str", "torch version"),
    ("torchao_version", "str", "torchao version"),
    ("torchvision_version", "str", "torchvision version"),
    ("python_version", "str", "python version"),
]
REPORT_KEYS: dict[str, ReportKey] = {name: ReportKey(name, t, m) for name, t, m in _KEYS}

_CHECKS = {
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v),
    "list[dict]": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
}


def _type_ok(type_name: str, value: object) -> bool:
    options = [t.strip() for t in type_name.split("|")]
    return (value is None and "None" in options) or any(
        _CHECKS[t](value) for t in options if t != "None"
    )


def _task_metric_keys(metric: object) -> set[str]:
    """The `<baseline>_<metric>` keys of a task's primary metric (none for an unnamed one)."""
    if not isinstance(metric, str) or not metric:
        return set()
    return {metric_key(baseline, metric) for baseline in METRIC_BASELINES}


def report_fields(**fields: object) -> dict:
    """`fields` as a report dict, each name checked against `REPORT_KEYS` (or, for a task's own
    metric, `<baseline>_<metric>` with the `metric` given among the fields) and each value
    against its type. Raises KeyError naming an unregistered key, TypeError naming a value of
    the wrong type. The keys and their meanings are listed below (`keys_markdown()`)."""
    metric_keys = _task_metric_keys(fields.get("metric"))
    for name, value in fields.items():
        if name in metric_keys and name not in REPORT_KEYS:
            expected = "float"
        elif name in REPORT_KEYS:
            expected = REPORT_KEYS[name].type
        else:
            raise KeyError(f"report key {name!r} is not registered in qatdist.run.report")
        if not _type_ok(expected, value):
            raise TypeError(f"report key {name!r}: expected {expected}, got {value!r}")
    return dict(fields)


def primary_metric(report: dict) -> str:
    """The report's primary metric name; `top1` for a report written before tasks existed
    (classification was then the only task)."""
    return report.get("metric") or CLASSIFICATION_METRIC


def metric_field(report: dict, baseline: str) -> float | None:
    """`<baseline>_<metric>` of the report's primary metric, None when absent."""
    return report.get(metric_key(baseline, primary_metric(report)))


def _better_by(report: dict, value: float, than: float) -> float:
    """How much better `value` is than `than` in the primary metric (positive: better)."""
    return value - than if report.get("higher_is_better", True) else than - value


def with_derived(report: dict) -> dict:
    """`report` (checked) with the keys computed from others, when their inputs are present:
    qat_gain_over_ptq, int8_drop_vs_fp32 (both from the primary metric), accuracy_budget_met,
    int8_slower_than_fp32."""
    report = report_fields(**report)
    int8, ptq, fp32 = (metric_field(report, k) for k in ("int8", "ptq_int8", "fp32"))
    if int8 is not None and ptq is not None:
        report["qat_gain_over_ptq"] = _better_by(report, int8, ptq)
    if int8 is not None and fp32 is not None:
        report["int8_drop_vs_fp32"] = _better_by(report, fp32, int8)
    budget = report.get("accuracy_budget")
    if budget is not None and budget >= 0 and "int8_drop_vs_fp32" in report:
        report["accuracy_budget_met"] = report["int8_drop_vs_fp32"] <= budget
    if report.get("int8_speedup") is not None:
        report["int8_slower_than_fp32"] = report["int8_speedup"] < 1.0
    return report


def field(report: dict, name: str) -> object:
    """`report[name]`, None when absent; `name` must be a registered key."""
    if name not in REPORT_KEYS:
        raise KeyError(f"report key {name!r} is not registered in qatdist.run.report")
    return report.get(name)


def keys_markdown() -> str:
    """The registry as a Markdown table (key, type, meaning), for the README and docs."""
    lines = ["| key | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k.name}` | {k.type} | {k.meaning} |" for k in REPORT_KEYS.values()]
    return "\n".join(lines)


report_fields.__doc__ += "\n\n" + keys_markdown()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" when not readable, e.g. not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_BASELINES = (
    ("start_fp32", "fp32, weights as given (before training)"),
    ("fp32", "fp32, final weights"),
    ("ptq_fp32", "fp32 at the PTQ step"),
    ("ptq_int8", "PTQ int8 (no QAT)"),
    ("int8", "QAT int8"),
)
_DERIVED = (("qat_gain_over_ptq", "QAT gain over PTQ"), ("int8_drop_vs_fp32", "int8 drop vs fp32"))


def metric_label(report: dict) -> str:
    """The primary metric as a reader says it: 'top-1' for top1, else its name."""
    metric = primary_metric(report)
    return "top-1" if metric == CLASSIFICATION_METRIC else metric


def baseline_rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) of each baseline of the primary metric present: fp32, PTQ int8, QAT int8,
    gain, drop. Empty when the report has neither the fp32 nor the PTQ int8 value (nothing to
    compare with)."""
    if metric_field(report, "fp32") is None and metric_field(report, "ptq_int8") is None:
        return []
    rows = []
    for baseline, label in _BASELINES:
        value = metric_field(report, baseline)
        if value is not None:
            rows.append((label, f"{value:.4f}"))
    for name, label in _DERIVED:
        value = field(report, name)
        if value is not None:
            rows.append((label, f"{value:+.4f}"))
    return rows


def _agreement_sentence(report: dict) -> str:
    parts = []
    for label, prefix in (
        ("compiled", "int8_compiled"),
        ("AOTI", "int8_aoti"),
        ("OpenVINO", "int8_openvino"),
    ):
        if field(report, f"{prefix}_max_abs_logit_diff") is None:
            continue
        parts.append(
            f"{label} {_fmt(field(report, f'{prefix}_agreement'))} over "
            f"{_fmt(field(report, f'{prefix}_comparable_samples'))} comparable sample(s), max "
            f"|logit difference| {_fmt(field(report, f'{prefix}_max_abs_logit_diff'), 6)}"
        )
    rule = (
        "Top-1 agreement with the converted model, judged where its top-2 logit margin exceeds "
        "the max |logit difference|"
        if primary_metric(report) == CLASSIFICATION_METRIC
        else "Agreement with the converted model, by the task's rule"
    )
    return (
        f"Samples: {_fmt(field(report, 'int8_eval_samples'))}. {rule}: {'; '.join(parts) or '-'}."
    )


def _weights_md(report: dict) -> list[str]:
    source = field(report, "weights_source")
    if not source:
        return []
    how = [f"under `{source['nesting_key']}`"] if source["nesting_key"] else []
    how += [f"prefix `{source['prefix_stripped']}` stripped"] if source["prefix_stripped"] else []
    read = f" ({', '.join(how)})" if how else ""
    return [f"Weights: `{source['file']}`{read}, sha256 `{source['sha256']}`.", ""]


def _baselines_md(report: dict) -> list[str]:
    rows = baseline_rows(report)
    if not rows:
        return []
    label = metric_label(report)
    lines = [f"## Baselines ({label})", "", f"| model | {label} |", "| --- | --- |"]
    return [*lines, *(f"| {label} | {value} |" for label, value in rows), ""]


def _quantized_ops_md(report: dict) -> list[str]:
    ops = field(report, "quantized_ops") or {}
    lines = ["## Quantized operators in the lowered model", ""]
    if ops:
        lines += [
            "| lowered code | quantized convolutions | quantized linears |",
            "| --- | --- | --- |",
            *(f"| {where} | {c['conv']} | {c['linear']} |" for where, c in ops.items()),
            "",
        ]
    else:
        lines += ["Not compiled: no lowered code to count.", ""]
    lines.append(
        f"The fp32 model has {_fmt(field(report, 'fp32_conv_layers'))} convolution(s) and "
        f"{_fmt(field(report, 'fp32_linear_layers'))} linear layer(s); the quantizer annotated "
        f"{_fmt(field(report, 'annotated_conv_layers'))} and "
        f"{_fmt(field(report, 'annotated_linear_layers'))}."
    )
    if field(report, "constant_layers"):
        lines.append(
            f"{len(field(report, 'constant_layers'))} layer(s) compute from parameters only and "
            "are folded to constants at compile time (kept fp32, no run-time cost)."
        )
    if field(report, "quantization_complete") is False:
        names = ", ".join(field(report, "unquantized_layers") or []) or "-"
        lines.append(f"**Quantization incomplete**: left in float: {names}.")
    return [*lines, ""]


def _isa(capabilities: dict | None) -> str:
    if capabilities is None:
        return "-"
    flags = [k for k, v in capabilities.items() if v is True and k != "int8_dot_product"]
    return ", ".join(flags) or "none"


def budget_sentence(report: dict) -> str | None:
    """Whether the accuracy budget was met and which layers stayed in fp32 (None when the run
    had no budget)."""
    budget = field(report, "accuracy_budget")
    if budget is None or budget < 0:
        return None
    layers = ", ".join(field(report, "fp32_fallback_layers") or []) or "none"
    met = "met" if field(report, "accuracy_budget_met") else "NOT met"
    return (
        f"Accuracy budget {budget:.4f} (fp32 - int8 {metric_label(report)}) {met}: int8 drop "
        f"{_fmt(field(report, 'int8_drop_vs_fp32'))}; layers kept in fp32 for it: {layers}."
    )


def sensitivity_markdown(report: dict) -> str | None:
    """The budget search's sensitivity table as Markdown (None when the report has none)."""
    rows = field(report, "sensitivity")
    if not rows:
        return None
    gain = f"{primary_metric(report)}_gain_when_float"
    lines = [
        f"| layer | SQNR dB | {metric_label(report)} gain when float | latency cost ms |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['layer']} | {_fmt(row['sqnr_db'], 2)} | {_fmt(row.get(gain))} "
        f"| {_fmt(row['latency_cost_ms'], 3)} |"
        for row in rows
    ]
    return "\n".join(lines)


def _budget_md(report: dict) -> list[str]:
    sentence, table = budget_sentence(report), sensitivity_markdown(report)
    if sentence is None and table is None:
        return []
    lines = ["## Accuracy budget", ""]
    if sentence:
        lines += [sentence, ""]
    if table:
        lines += ["Per-layer sensitivity (lowest SQNR first):", "", table, ""]
    return lines


_INT8_LABELS = {
    "int8": "int8 compiled (Inductor)",
    "int8_aoti": "int8 AOTI",
    "int8_openvino": "int8 OpenVINO IR",
}


def _fastest_md(rows: list[dict]) -> list[str]:
    """One line per batch size naming the fastest int8 artifact, when more than one was timed."""
    lines = []
    for row in rows:
        timed = {n: row[f"{n}_ms"] for n in _INT8_LABELS if f"{n}_ms" in row}
        if len(timed) < 2 or "fastest_int8" not in row:
            continue
        best = row["fastest_int8"]
        others = ", ".join(
            f"{_INT8_LABELS[n]} {ms / timed[best]:.2f}x its latency"
            for n, ms in timed.items()
            if n != best
        )
        lines.append(
            f"- batch {row['batch_size']}: fastest on this CPU: {_INT8_LABELS[best]} "
            f"({timed[best]:.3f} ms); {others}"
        )
    return ["", *lines] if lines else []


# How to load what finalize writes, so that a compiled model gets the int8 kernels.
LOADING_MD = [
    "## Loading the artifacts",
    "",
    "- `model_int8.pt2`: `qatdist.quant.load_int8(path).module()`, then `torch.compile` with "
    "`torch._inductor.config.freezing = True`. Without qatdist, `import "
    "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer` before `torch.export.load`: "
    "torchao registers Inductor's int8 lowering only there, and a compile after a plain "
    "`import torchao` silently runs fp32 convolutions.",
    "- `model_int8_aoti.pt2` (when written): `torch._inductor.aoti_load_package(path)`, in any "
    "process with torch; the int8 kernels are already compiled in.",
    "- `model_int8_openvino.xml` / `.bin` (when written): `openvino.Core().compile_model(path, "
    "'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})` (without the hint, a CPU with AVX512-BF16 "
    "runs the layers between the int8 ones in bf16).",
    "",
]


def markdown(report: dict) -> str:
    """`report.md`: baselines, accuracy, the accuracy budget and sensitivity table (when the
    run had one), latency/throughput per batch size, quantized op counts, machine."""
    f = lambda name: field(report, name)  # noqa: E731
    m = lambda baseline: metric_field(report, baseline)  # noqa: E731
    label = metric_label(report)
    lines = [
        f"# Final int8 report: {f('model') or '?'}",
        "",
        f"Checkpoint: `{f('checkpoint') or '-'}` (step {_fmt(f('steps'))}, "
        f"{_fmt(f('world_size'))} rank(s), global batch {_fmt(f('global_batch_size'))}).",
        "",
        *_weights_md(report),
        *_baselines_md(report),
        f"## Accuracy ({label} on the validation shards)",
        "",
        f"| model | {label} |",
        "| --- | --- |",
        f"| fp32 fake-quant (prepared QAT model) | {_fmt(m('fp32_fake_quant'))} |",
        f"| int8 converted, eager reference | {_fmt(m('int8_reference'))} |",
        f"| int8 compiled (Inductor, freezing) | {_fmt(m('int8'))} |",
        f"| int8 AOTInductor package | {_fmt(m('int8_aoti'))} |",
        *(
            [f"| int8 OpenVINO IR | {_fmt(m('int8_openvino'))} |"]
            if m("int8_openvino") is not None
            else []
        ),
        "",
        _agreement_sentence(report),
        "",
        *_budget_md(report),
        "## Latency (median ms per batch) and throughput (images/s)",
        "",
        "| batch | fp32 compiled ms | int8 compiled ms | int8 AOTI ms | int8 OpenVINO ms "
        "| int8 speedup | fp32 img/s | int8 img/s | int8 AOTI img/s | int8 OpenVINO img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in f("latency") or []:
        lines.append(
            f"| {row['batch_size']} | {_fmt(row['fp32_ms'], 3)} | {_fmt(row['int8_ms'], 3)} "
            f"| {_fmt(row.get('int8_aoti_ms'), 3)} | {_fmt(row.get('int8_openvino_ms'), 3)} "
            f"| {_fmt(row['int8_speedup'], 2)} "
            f"| {_fmt(row['fp32_images_per_s'], 1)} | {_fmt(row['int8_images_per_s'], 1)} "
            f"| {_fmt(row.get('int8_aoti_images_per_s'), 1)} "
            f"| {_fmt(row.get('int8_openvino_images_per_s'), 1)} |"
        )
    lines += _fastest_md(f("latency") or [])
    if f("int8_slower_than_fp32"):
        causes = "; ".join(f("int8_slower_causes") or []) or "none found"
        lines += ["", f"**int8 is slower than fp32** at this batch size. Likely causes: {causes}."]
    lines += ["", *_quantized_ops_md(report), *LOADING_MD]
    lines += [
        "## Machine and versions",
        "",
        f"- CPU: {_fmt(f('cpu_model'))}; int8 instructions: {_isa(f('cpu_int8_capabilities'))}",
        f"- torch threads: {_fmt(f('threads'))}",
        f"- torch {_fmt(f('torch_version'))}, torchao {_fmt(f('torchao_version'))}, "
        f"torchvision {_fmt(f('torchvision_version'))}, python {_fmt(f('python_version'))}",
        "",
    ]
    return "\n".join(lines)


def latency_png(path: Path, batch_sizes: list[int], series: dict[str, list[float]]) -> None:
    """Plot latency (ms, from 0) against batch size (log2 axis, the batch sizes as ticks) into
    a PNG, one line per entry of `series` ({label: latency per batch size})."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend or display is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    figure = Figure(figsize=(7.2, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, values in series.items():
        axes.plot(batch_sizes, values, marker="o", linewidth=2, label=label)
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(batch_sizes))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([str(b) for b in batch_sizes])
    if len(batch_sizes) == 1:  # one point: give it room on both sides
        axes.set_xlim(batch_sizes[0] / 2, batch_sizes[0] * 2)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("batch size")
    axes.set_ylabel("latency per batch (ms, median)")
    axes.set_title("Latency against batch size")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
