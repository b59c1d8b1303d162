"""The CamVid results tables of the README and docs/segmentation.md, from the run folders.

  python scripts/segmentation_table.py --fp32 runs/camvid-fp32 --qat runs/camvid-qat \
      --control runs/camvid-fp32-control [--peers peers-camvid.json]

Reads each run's `final/report.json` (and `resolved_config.toml` for the model and sizes) and
prints markdown: the accuracy of every model the recipe makes (mIoU, pixel accuracy and the IoU
of CamVid's rare classes), the latency at the evaluation frame (the QAT run's int8 and fp32,
compiled; with `--peers`, `scripts/bench.py --peers --json`'s segmenter row: OpenVINO, ONNX
Runtime and qatdist's other artifacts), and each run's wall time (from the run folder's creation
to its report). A run folder without a report is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

# CamVid's classes the usual class weighting is for (../shared/data/README.md pixel counts).
RARE_CLASSES = ("pole", "sign_symbol", "fence", "pedestrian", "bicyclist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, required=True, metavar="DIR", help="fp32 run")
    parser.add_argument("--qat", type=Path, required=True, metavar="DIR", help="QAT run")
    parser.add_argument(
        "--control", type=Path, required=True, metavar="DIR", help="the QAT run's fp32 control"
    )
    parser.add_argument(
        "--peers", type=Path, metavar="JSON", help="scripts/bench.py --peers --json output"
    )
    return parser


class RunError(Exception):
    pass


def load_run(folder: Path) -> dict:
    """The run's report, resolved config and wall time (seconds)."""
    report_path = folder / "final" / "report.json"
    config_path = folder / "resolved_config.toml"
    for path in (report_path, config_path):
        if not path.is_file():
            raise RunError(f"{folder}: no {path.relative_to(folder)} (not a finished run)")
    report = json.loads(report_path.read_text())
    if report.get("task") != "segmentation":
        raise RunError(f"{folder}: task {report.get('task')!r}, not a segmentation run")
    config = tomllib.loads(config_path.read_text())
    wall = report_path.stat().st_mtime - config_path.stat().st_mtime
    return {"report": report, "config": config, "wall_s": wall, "folder": folder}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def accuracy_rows(qat: dict, control: dict) -> list[tuple[str, str, dict | None]]:
    """(model, where it comes from, its metric values) for each model the recipe makes."""
    q, c = qat["report"], control["report"]

    def values(report: dict, baseline: str) -> dict | None:
        # Reports written before <baseline>_metric_values existed hold the primary value only.
        primary = report.get(f"{baseline}_miou")
        return report.get(f"{baseline}_metric_values") or ({"miou": primary} if primary else None)

    return [
        # The fp32 run's final weights, as the QAT run scored them before its first step.
        ("fp32 (the fp32 run's final weights)", "QAT run, step 0", values(q, "start_fp32")),
        ("PTQ int8 of those weights", "QAT run, step 0", q.get("ptq_int8_metric_values")),
        (
            "fp32 control (fp32 fine-tuning, QAT's steps)",
            "control run",
            c.get("fp32_metric_values"),
        ),
        ("QAT's weights in float (fake quant off)", "QAT run", values(q, "fp32")),
        ("QAT fake-quant", "QAT run", values(q, "fp32_fake_quant")),
        ("QAT int8, converted reference", "QAT run", q.get("int8_reference_metric_values")),
        ("QAT int8, compiled (the deployed model)", "QAT run", q.get("int8_metric_values")),
    ]


def accuracy_table(qat: dict, control: dict) -> str:
    head = ["model", "from", "mIoU", "pixel acc.", *(f"IoU {c}" for c in RARE_CLASSES)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, source, values in accuracy_rows(qat, control):
        values = values or {}
        cells = [name, source, _pct(values.get("miou")), _pct(values.get("pixel_accuracy"))]
        cells += [_pct(values.get(f"iou_{c}")) for c in RARE_CLASSES]
        lines.append("| " + " | ".join(cells) + " |")
    q, c = qat["report"], control["report"]
    gap = c["fp32_miou"] - q["int8_miou"]
    gain = q["int8_miou"] - q["ptq_int8_miou"]
    lines.append("")
    lines.append(
        f"QAT int8 (compiled) vs the fp32 control: {100 * -gap:+.2f} mIoU points (goal: within "
        f"0.5 below); vs PTQ int8: {100 * gain:+.2f} points (goal: at least 0)."
    )
    return "\n".join(lines)


def latency_table(qat: dict, peers: dict | None) -> str:
    """ms per batch at the evaluation frame: the QAT run's compiled int8 and fp32, and the
    bench's segmenter row when given."""
    report = qat["report"]
    rows = {
        row["batch_size"]: {
            "qatdist int8 (Inductor)": row["int8_ms"],
            "fp32 (Inductor)": row["fp32_ms"],
        }
        for row in report["latency"]
    }
    peer_model = None
    if peers is not None:
        peer_model = report["model"]
        for batch, ms in peers["peer_latency_ms"].get(peer_model, {}).items():
            for stack, value in ms.items():
                rows.setdefault(int(batch), {})[f"bench: {stack}"] = value
    stacks = list(dict.fromkeys(s for ms in rows.values() for s in ms))
    height, width = qat["config"]["task"]["eval_size"]
    lines = [
        f"ms per batch of {height}x{width} frames (medians)",
        "",
        "| batch | " + " | ".join(stacks) + " | int8 / fp32 (run) |",
        "|" + " --- |" * (len(stacks) + 2),
    ]
    for batch in sorted(rows):
        ms = rows[batch]
        ratio = (
            f"{ms['qatdist int8 (Inductor)'] / ms['fp32 (Inductor)']:.2f}"
            if "fp32 (Inductor)" in ms and "qatdist int8 (Inductor)" in ms
            else "-"
        )
        cells = [f"{ms[s]:.1f}" if s in ms else "-" for s in stacks]
        lines.append(f"| {batch} | " + " | ".join(cells) + f" | {ratio} |")
    if peer_model is not None:
        ratios = peers["int8_vs_best_peer"].get(peer_model, {})
        lines.append("")
        lines.append(
            "bench int8_vs_best_peer (fastest qatdist int8 artifact / fastest peer int8): "
            + ", ".join(f"batch {b}: {r:.2f}" for b, r in ratios.items() if r is not None)
        )
    return "\n".join(lines)


def runs_table(runs: dict[str, dict]) -> str:
    lines = ["| run | model | steps | train crop | eval frame | wall time |", "|" + " --- |" * 6]
    for name, run in runs.items():
        report, config = run["report"], run["config"]
        crop = "x".join(map(str, config["task"]["crop_size"]))
        frame = "x".join(map(str, config["task"]["eval_size"]))
        minutes = run["wall_s"] / 60
        lines.append(
            f"| {name} ({run['folder']}) | {report['model']} | {report['steps']} | {crop} | "
            f"{frame} | {minutes:.0f} min |"
        )
    report = runs["QAT"]["report"]
    lines.append("")
    features = [k for k, v in report["cpu_int8_capabilities"].items() if v is True]
    lines.append(
        f"Machine: {report['cpu_model']} ({', '.join(features) or 'no int8 dot products'}), "
        f"{report['world_size']} ranks; torch {report['torch_version']}, torchao "
        f"{report['torchao_version']}; int8 target {report.get('int8_target')}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = {"fp32": load_run(args.fp32), "QAT": load_run(args.qat)}
        runs["fp32 control"] = load_run(args.control)
        peers = json.loads(args.peers.read_text()) if args.peers else None
    except (RunError, OSError, json.JSONDecodeError) as e:
        print(f"segmentation_table.py: {e}", file=sys.stderr)
        return 2
    print(accuracy_table(runs["QAT"], runs["fp32 control"]))
    print()
    print(latency_table(runs["QAT"], peers))
    print()
    print(runs_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
