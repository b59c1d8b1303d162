"""Human-readable views of a final report: `report.md`, `latency.png`, and the machine facts.

The PNG is drawn with PIL (installed with torchvision) so that no plotting library is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# One colour per latency series, in the order they are drawn and listed in the legend.
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


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


def markdown(report: dict) -> str:
    """`report.md`: accuracy, latency/throughput per batch size, quantized op counts, machine."""
    lines = [
        f"# Final int8 report: {report.get('model', '?')}",
        "",
        f"Checkpoint: `{report.get('checkpoint') or '-'}` (step {report.get('steps', '-')}, "
        f"{report.get('world_size', '-')} rank(s), global batch "
        f"{report.get('global_batch_size', '-')}).",
        "",
        "## Accuracy (top-1 on the validation shards)",
        "",
        "| model | top-1 |",
        "| --- | --- |",
        f"| fp32 fake-quant (prepared QAT model) | {_fmt(report.get('fp32_fake_quant_top1'))} |",
        f"| int8 converted, eager reference | {_fmt(report.get('int8_reference_top1'))} |",
        f"| int8 compiled (Inductor, freezing) | {_fmt(report.get('int8_top1'))} |",
        f"| int8 AOTInductor package | {_fmt(report.get('int8_aoti_top1'))} |",
        "",
        f"Samples: {report.get('int8_eval_samples', '-')}. Top-1 agreement with the converted "
        f"model: compiled {_fmt(report.get('int8_compiled_agreement'))}, AOTI "
        f"{_fmt(report.get('int8_aoti_agreement'))}; max |logit difference|: compiled "
        f"{_fmt(report.get('int8_compiled_max_abs_logit_diff'), 6)}, AOTI "
        f"{_fmt(report.get('int8_aoti_max_abs_logit_diff'), 6)}.",
        "",
        "## Latency (median ms per batch) and throughput (images/s)",
        "",
        "| batch | fp32 compiled ms | int8 compiled ms | int8 AOTI ms | int8 speedup "
        "| fp32 img/s | int8 img/s | int8 AOTI img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.get("latency", []):
        lines.append(
            f"| {row['batch_size']} | {_fmt(row['fp32_ms'], 3)} | {_fmt(row['int8_ms'], 3)} "
            f"| {_fmt(row.get('int8_aoti_ms'), 3)} | {_fmt(row['int8_speedup'], 2)} "
            f"| {_fmt(row['fp32_images_per_s'], 1)} | {_fmt(row['int8_images_per_s'], 1)} "
            f"| {_fmt(row.get('int8_aoti_images_per_s'), 1)} |"
        )
    ops = report.get("quantized_ops") or {}
    lines += ["", "## Quantized operators in the lowered model", ""]
    if ops:
        lines += [
            "| lowered code | quantized convolutions | quantized linears |",
            "| --- | --- | --- |",
        ]
        for where, counts in ops.items():
            lines.append(f"| {where} | {counts['conv']} | {counts['linear']} |")
        lines.append("")
        lines.append(
            f"The fp32 model has {report.get('fp32_conv_layers', '-')} convolution(s) and "
            f"{report.get('fp32_linear_layers', '-')} linear layer(s)."
        )
    else:
        lines.append("Not compiled: no lowered code to count.")
    lines += [
        "",
        "## Machine and versions",
        "",
        f"- CPU: {report.get('cpu_model', '-')}",
        f"- torch threads: {report.get('threads', '-')}",
        f"- torch {report.get('torch_version', '-')}, "
        f"torchao {report.get('torchao_version', '-')}, "
        f"torchvision {report.get('torchvision_version', '-')}, "
        f"python {report.get('python_version', '-')}",
        "",
    ]
    return "\n".join(lines)


def latency_png(path: Path, batch_sizes: list[int], series: dict[str, list[float]]) -> None:
    """Draw latency (ms, linear axis from 0) against batch size (log2 axis) as a PNG, one line
    per entry of `series` ({label: latency per batch size})."""
    width, height = 720, 460
    left, right, top, bottom = 80, 200, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    plot_w, plot_h = width - left - right, height - top - bottom

    xs = [math.log2(b) for b in batch_sizes]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_hi = max((v for values in series.values() for v in values), default=1.0) * 1.1 or 1.0

    def point(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_lo) / (x_hi - x_lo) * plot_w,
            top + plot_h - y / y_hi * plot_h,
        )

    draw.text((left, 15), "Latency against batch size (median per batch)", fill="black", font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for b, x in zip(batch_sizes, xs):
        px, py = point(x, 0)
        draw.line([px, py, px, py + 5], fill="black")
        draw.text((px - 6, py + 8), str(b), fill="black", font=font)
    for i in range(6):
        value = y_hi * i / 5
        px, py = point(x_lo, value)
        draw.line([px - 5, py, px, py], fill="black")
        draw.text((8, py - 6), f"{value:.2f}", fill="black", font=font)
    draw.text((left + plot_w // 2 - 40, height - 25), "batch size", fill="black", font=font)
    draw.text((8, top - 20), "latency (ms)", fill="black", font=font)

    for i, (label, values) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [point(x, v) for x, v in zip(xs, values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        ly = top + 10 + 20 * i
        draw.line([left + plot_w + 15, ly + 6, left + plot_w + 45, ly + 6], fill=colour, width=3)
        draw.text((left + plot_w + 52, ly), label, fill="black", font=font)
    image.save(path, format="PNG")
