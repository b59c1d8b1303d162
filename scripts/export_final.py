"""Export a qatdist run's checkpoint as a deployable int8 model, with accuracy and latency.

  python scripts/export_final.py --run-dir runs/resnet18
  python scripts/export_final.py --run-dir runs/r18 --checkpoint runs/r18/checkpoints/step-400 \
      --out exports/r18-400 --batch-sizes 1,8,32
  python scripts/export_final.py --run-dir runs/r18 --formats pt2,aoti,openvino

Writes model_int8.pt2 (torch.export, dynamic batch), model_int8_aoti.pt2 (AOTInductor package),
with `--formats ...,openvino` model_int8_openvino.xml/.bin (OpenVINO IR), report.json, report.md
and latency.png into --out, all at once at the end. A missing or corrupt run directory or
checkpoint, or a format whose package is not installed, exits with status 2 and leaves --out
untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return sorted(set(sizes))


FORMATS = ("pt2", "aoti", "openvino")


def formats(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(FORMATS)}, got {text!r}"
        )
    return [f for f in FORMATS if f in names or f == "pt2"]  # pt2 is always written


def _agreement(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"  # None: no sample was comparable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Rebuild a run's QAT model from its resolved_config.toml, load a checkpoint, "
        "convert to int8, compile with Inductor freezing, evaluate top-1 on the val shards, "
        "benchmark int8 against fp32 and write the artifacts.",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="Run directory of a qatdist training run (holds resolved_config.toml and "
        "checkpoints/).",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="Checkpoint folder (checkpoints/step-N) to export; default: the newest complete, "
        "intact one in the run directory.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="Folder for the artifacts; default: <run-dir>/final (files there are replaced).",
    )
    parser.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default=[1, 32],
        metavar="N,N",
        help="Comma-separated batch sizes to benchmark (default 1,32); accuracy is measured at "
        "the largest.",
    )
    parser.add_argument(
        "--formats",
        type=formats,
        default=["pt2", "aoti"],
        metavar="F,F",
        help="Comma-separated artifact formats (default pt2,aoti): pt2 = model_int8.pt2 "
        "(always written), aoti = model_int8_aoti.pt2 (AOTInductor package), openvino = "
        "model_int8_openvino.xml/.bin (OpenVINO IR of the same QAT scales; needs openvino: "
        "pip install -e '.[peers]'). Each is timed and evaluated in the report.",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        metavar="N",
        help="Timed iterations per batch size; default: the run's runtime.latency_iters.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters is not None and args.iters < 1:
        print("export_final.py: error: --iters must be >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qatdist.finish.export import ExportError, export_run  # heavy imports after argument checks
    from qatdist.run import report as reports
    from qatdist.run.folder import RunFolder

    try:
        report = export_run(
            args.run_dir,
            checkpoint=args.checkpoint,
            out_dir=args.out,
            batch_sizes=args.batch_sizes,
            latency_iters=args.iters,
            formats=args.formats,
        )
    except ExportError as e:
        print(f"export_final.py: error: {e}", file=sys.stderr)
        return 2
    out = args.out or RunFolder(args.run_dir).final
    fallback = report.get("fp32_fallback_layers")
    artifacts = [
        f"{label} agreement {_agreement(report.get(f'int8_{key}_agreement'))}"
        for key, label in (("aoti", "AOTI"), ("openvino", "OpenVINO"))
        if key in args.formats
    ]
    metric = reports.metric_label(report)
    int8, fake_quant = (reports.metric_field(report, b) for b in ("int8", "fp32_fake_quant"))
    print(
        f"{report['model']} step {report['steps']}: int8 {metric} {int8:.4f} "
        f"(fake-quant {fake_quant:.4f})"
        + "".join(f", {a}" for a in artifacts)
        + "; "
        + (f"kept in fp32 for the accuracy budget: {', '.join(fallback)}; " if fallback else "")
        + ", ".join(
            f"batch {row['batch_size']}: x{row['int8_speedup']:.2f}, fastest int8 "
            f"{row['fastest_int8']}"
            for row in report["latency"]
        )
        + f" -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
