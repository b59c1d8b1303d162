"""qatdist benchmark: every figure is a ratio of two timings measured side by side in one run.

  python scripts/bench.py                      # full run (several minutes of compiles)
  python scripts/bench.py --quick --json bench.json
  python scripts/bench.py --peers --json peers.json   # against OpenVINO and ONNX Runtime

Figures: QAT train step vs fp32 eager step, DDP 2x1 vs 1x2 throughput, int8 vs fp32 compiled
inference, data-loader wait fraction, qatdist's final int8 model vs the hand-written PT2E flow.
Absolute timings depend on what else runs on the machine; the ratios are the result.

--peers runs instead a side-by-side comparison with the runtimes a user could deploy int8 on
(OpenVINO + NNCF, ONNX Runtime; `pip install -e '.[peers]'`): `benchmarks/peers.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torchvision

# The measurement code is the repo's top-level `benchmarks` package, not part of the installed
# library; `python scripts/bench.py` puts only scripts/ on sys.path, so add the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks  # noqa: E402

JSON_KEYS = (
    "qat_step_ratio",
    "ddp_scaling_ratio",
    "int8_speedup",
    "int8_speedup_geomean",
    "data_wait_fraction",
    "final_model_vs_hand_flow",
)
# Written after the contract keys: the same measurements with a lever switched, for reference
# (QAT with torchao's own fake-quant op; QAT with quant.fused_weight_scaling = false; DDP
# with runtime.grad_compression = "bf16"), and where a QAT step's extra time goes, per model
# (`benchmarks.figures.step_overhead_profile`).
REFERENCE_KEYS = (
    "qat_step_ratio_torchao_op",
    "qat_step_ratio_unfused_weight_scaling",
    "ddp_scaling_ratio_bf16_grads",
    "qat_step_overhead_profile",
)

# The project's targets: (figure, model) -> (comparison, bound). Model None: a single number;
# "*": every model measured (or expected) for that figure.
TARGETS = {
    ("qat_step_ratio", "resnet18"): ("<=", 1.15),
    ("qat_step_ratio", "mobilenet_v3_large"): ("<=", 1.25),
    ("ddp_scaling_ratio", None): (">=", 0.90),
    ("int8_speedup", "*"): (">=", 2.0),
    ("int8_speedup_geomean", None): (">=", 3.25),
    ("data_wait_fraction", None): ("<", 0.02),
    ("final_model_vs_hand_flow", None): ("<=", 1.05),
}

# Written by --peers (instead of the keys above): latencies per model, batch and stack; the
# fastest qatdist int8 artifact over the fastest peer int8 per model and batch, and its geomean
# per batch; each stack's agreement with eager fp32; what could not run and why; what was
# stopped at its deadline (hung); the peer packages' versions; which qatdist artifact was the
# fastest per model and batch.
PEER_JSON_KEYS = (
    "peer_latency_ms",
    "int8_vs_best_peer",
    "int8_vs_best_peer_geomean",
    "peer_agreement",
    "peer_skipped",
    "peer_hung",
    "peer_versions",
    "fastest_qatdist_artifact",
)
PEER_BATCH_SIZES = (1, 32)
# The --peers segmenter row: CamVid's model (configs/camvid_*.toml) at CamVid's full frame.
# Its ratios are reported per model, outside int8_vs_best_peer_geomean (the classifiers').
SEGMENTER_MODELS = ["lraspp_mobilenet_v3_large"]
SEGMENTER_FRAME = (360, 480)
SEGMENTER_BATCH_SIZES = (1, 8)

QAT_MODELS = ["resnet18", "mobilenet_v3_large"]
INT8_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large"]


@dataclass(frozen=True)
class Plan:
    """Sizes and iteration counts of one benchmark run."""

    qat_models: list[str]
    int8_models: list[str]
    image_size: int  # single-process figures (the DDP figure is always 32x32)
    step_warmup: int
    step_iters: int
    ddp_rounds: int
    ddp_steps: int
    latency_iters: int
    data_steps: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure qatdist's benchmark figures, each as a ratio of two timings taken "
        "side by side (interleaved) in this run, and compare them with the project's targets.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Reduced run (about 3 minutes on a quiet 2-core machine): resnet18 only, 32x32 "
        "inputs for the synthetic-data figures, fewer iterations. Still writes every JSON key.",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="Instead of the figures above: qatdist's int8 artifacts (PTQ; Inductor freezing, "
        "the AOTI package, the OpenVINO IR) against OpenVINO + NNCF and ONNX Runtime int8, and "
        "Inductor / OpenVINO fp32, on torchvision models at 224x224, batch "
        f"{' and '.join(map(str, PEER_BATCH_SIZES))}, each stack in its own process, "
        "interleaved (needs the `peers` extra; stacks whose packages are missing are listed, "
        "not run; a stack that does not answer within its deadline is stopped and listed as "
        "hung; one of qatdist's own stacks failing or hanging ends the run with exit code 1). "
        f"Models: {','.join(INT8_MODELS)}, and the segmenter {','.join(SEGMENTER_MODELS)} at "
        f"{SEGMENTER_FRAME[0]}x{SEGMENTER_FRAME[1]}, batch "
        f"{' and '.join(map(str, SEGMENTER_BATCH_SIZES))} (--quick: resnet18, fewer "
        "iterations).",
    )
    parser.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="With --peers: also time qatdist's int8 compiled with Inductor's cpp_wrapper (a "
        "lever for small batches; not counted in int8_vs_best_peer; longer compiles).",
    )
    parser.add_argument(
        "--segmenter-weights",
        metavar="PATH",
        help="With --peers: the segmenter row's trained weights (a state dict such as "
        "`scripts/fp32_weights.py` writes for configs/camvid_fp32.toml's run) instead of random "
        "init, whose int8 error is no guide to a trained model's.",
    )
    parser.add_argument(
        "--segmenter-frames",
        metavar="DIR",
        help="With --peers: a folder of images (e.g. ../shared/data/camvid/val/images) for the "
        "segmenter row's calibration, agreement and timing instead of Gaussian noise.",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="Also write the figures to PATH as JSON (keys: " + ", ".join(JSON_KEYS) + "; "
        "with --peers: " + ", ".join(PEER_JSON_KEYS) + ").",
    )
    parser.add_argument(
        "--models",
        metavar="LIST",
        help="Comma-separated torchvision model names for the per-model figures "
        "(qat_step_ratio, int8_speedup); default: the figures' own lists "
        f"({','.join(QAT_MODELS)} and {','.join(INT8_MODELS)}), resnet18 with --quick. "
        "The DDP, data and hand-flow figures always use resnet18. With --peers the list may "
        "name torchvision segmenters too (timed at the segmenter row's frame and batches).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        metavar="N",
        help="Torch threads of the single-process figures, and the rank count of the DDP "
        "figure (N ranks x 1 thread vs 1 rank x N threads; needs N usable CPUs). Default 2.",
    )
    return parser


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(["resnet18"], ["resnet18"], 32, 2, 5, 2, 5, 10, 15)
    else:
        plan = Plan(QAT_MODELS, INT8_MODELS, 64, 3, 10, 5, 10, 30, 30)
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        plan = replace(plan, qat_models=names, int8_models=names)
    return plan


def _section(title: str) -> None:
    print(f"\n## {title}", flush=True)


def _shape(shape: list[int]) -> str:
    return "x".join(str(s) for s in shape)


def _agreement(r: dict) -> str:
    if r["agreement_comparable"] == 0:
        return "not judged: no sample's top-2 margin exceeds the logit difference"
    return f"{r['top1_agreement']:.3f} of {r['agreement_comparable']} decided samples"


def _meets(value: float, op: str, target: float) -> bool:
    return {"<=": value <= target, ">=": value >= target, "<": value < target}[op]


def summary_rows(results: dict, expected_models: dict[str, list[str]]) -> list[tuple]:
    """(figure, measured text, target text, verdict) rows; models listed in `expected_models`
    but absent from `results` are shown as not measured."""
    rows = []
    for (key, model), (op, target) in TARGETS.items():
        if model is None:
            names = [None]
        elif model == "*":
            names = sorted(set(expected_models.get(key, [])) | set(results.get(key, {})))
        else:
            names = [model]
        for name in names:
            label = key if name is None else f"{key} {name}"
            value = results.get(key) if name is None else results.get(key, {}).get(name)
            if value is None:
                rows.append((label, "not measured", f"{op} {target}", "-"))
            else:
                verdict = "met" if _meets(value, op, target) else "NOT met"
                rows.append((label, f"{value:.3f}", f"{op} {target}", verdict))
    return rows


def markdown_table(rows: list[tuple]) -> str:
    lines = ["| figure | measured | target | |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _training_figures(plan: Plan, threads: int, results: dict) -> None:
    """The QAT step ratios and the DDP scaling ratio, printed and stored in `results`."""
    _section("qat_step_ratio: QAT train step / fp32 eager train step (SGD, interleaved)")
    results["qat_step_ratio"] = {}
    for name in plan.qat_models:
        r = benchmarks.qat_step_ratio(
            name,
            image_size=plan.image_size,
            threads=threads,
            warmup=plan.step_warmup,
            iters=plan.step_iters,
        )
        results["qat_step_ratio"][name] = r["ratio"]
        results.setdefault("qat_step_ratio_torchao_op", {})[name] = r["ratio_torchao_op"]
        results.setdefault("qat_step_ratio_unfused_weight_scaling", {})[name] = r[
            "ratio_unfused_weight_scaling"
        ]
        print(
            f"{name}: input {_shape(r['shape'])}, {r['threads']} threads, {r['iters']} steps "
            f"each: QAT {r['qat_ms']:.1f} ms, fp32 {r['fp32_ms']:.1f} ms -> {r['ratio']:.3f} "
            f"(QAT with torchao's fake-quant op {r['qat_torchao_op_ms']:.1f} ms -> "
            f"{r['ratio_torchao_op']:.3f}; with quant.fused_weight_scaling=false "
            f"{r['qat_unfused_weight_scaling_ms']:.1f} ms -> "
            f"{r['ratio_unfused_weight_scaling']:.3f})",
            flush=True,
        )
        profile = r["overhead_profile"]
        results.setdefault("qat_step_overhead_profile", {})[name] = profile
        print(
            f"  what QAT adds (torch.profiler, self CPU per step: QAT "
            f"{profile['qat_total_ms']:.1f} ms, fp32 {profile['fp32_total_ms']:.1f} ms), "
            "largest first:"
        )
        for op, qat_ms, fp32_ms in profile["ops"]:
            print(f"    {qat_ms - fp32_ms:+7.1f} ms  {op} (QAT {qat_ms:.1f}, fp32 {fp32_ms:.1f})")

    _section("ddp_scaling_ratio: throughput N ranks x 1 thread / 1 rank x N threads (gloo)")
    r = benchmarks.ddp_scaling_ratio(
        ranks=threads,
        rounds=plan.ddp_rounds,
        warmup=plan.step_warmup,
        steps=plan.ddp_steps,
    )
    results["ddp_scaling_ratio"] = r["ratio"]
    results["ddp_scaling_ratio_bf16_grads"] = r["ratio_bf16_grads"]
    print(
        f"{r['model']} QAT, global batch {_shape(r['shape'])}, {r['rounds']} rounds x "
        f"{r['steps']} steps\n  {r['multi']}: {r['multi_images_per_s']:.1f} img/s "
        f"(rounds {', '.join(f'{v:.1f}' for v in r['multi_each'])})\n  {r['single']}: "
        f"{r['single_images_per_s']:.1f} img/s "
        f"(rounds {', '.join(f'{v:.1f}' for v in r['single_each'])})\n  -> {r['ratio']:.3f}"
        f"\n  with runtime.grad_compression=bf16: {r['multi_bf16_grads_images_per_s']:.1f} "
        f"img/s -> {r['ratio_bf16_grads']:.3f}",
        flush=True,
    )


def _int8_figures(plan: Plan, threads: int, results: dict) -> None:
    """The int8 speedups and their geometric mean, printed and stored in `results`."""
    _section("int8_speedup: fp32 compiled latency / int8 compiled latency (interleaved)")
    results["int8_speedup"] = {}
    for name in plan.int8_models:
        r = benchmarks.int8_speedup(
            name, image_size=plan.image_size, threads=threads, iters=plan.latency_iters
        )
        results["int8_speedup"][name] = r["ratio"]
        print(
            f"{name}: input {_shape(r['shape'])}, {r['threads']} threads, {r['iters']} iters: "
            f"fp32 {r['fp32_ms']:.2f} ms, int8 {r['int8_ms']:.2f} ms -> {r['ratio']:.3f} "
            f"(compile int8 {r['compile_s']['int8']:.0f} s, fp32 {r['compile_s']['fp32']:.0f} s)",
            flush=True,
        )
    results["int8_speedup_geomean"] = statistics.geometric_mean(results["int8_speedup"].values())
    print(
        f"geomean over {len(results['int8_speedup'])} model(s): "
        f"{results['int8_speedup_geomean']:.3f}"
    )


def run(plan: Plan, threads: int, quick: bool) -> dict:
    """Measure every figure; print each as it completes. Returns the JSON-contract dict."""
    results: dict = {}
    _training_figures(plan, threads, results)
    _int8_figures(plan, threads, results)

    _section("data_wait_fraction: time blocked on the next batch / step time (demo config)")
    r = benchmarks.data_wait_fraction(steps=plan.data_steps)
    results["data_wait_fraction"] = r["fraction"]
    print(
        f"{r['model']} QAT on demo shards, batch {_shape(r['shape'])}, data.num_workers "
        f"{r['num_workers']}, trainer placement: compute CPUs {r['cpus']} ({r['threads']} "
        f"thread(s)), loader CPUs {r['loader_cpus']}; {r['steps']} steps: waited "
        f"{r['wait_s']:.3f} s, computed {r['step_s']:.2f} s -> {r['fraction']:.4f}",
        flush=True,
    )

    _section("final_model_vs_hand_flow: qatdist int8 latency / hand-written flow's (same weights)")
    r = benchmarks.final_model_vs_hand_flow(
        image_size=plan.image_size, threads=threads, iters=plan.latency_iters
    )
    results["final_model_vs_hand_flow"] = r["ratio"]
    print(
        f"{r['model']}: input {_shape(r['shape'])}, {r['threads']} threads, {r['iters']} iters: "
        f"qatdist {r['qatdist_ms']:.2f} ms, hand flow {r['hand_ms']:.2f} ms -> {r['ratio']:.3f} "
        f"(top-1 agreement {_agreement(r)}; compile qatdist "
        f"{r['compile_s']['qatdist']:.0f} s, hand {r['compile_s']['hand']:.0f} s)",
        flush=True,
    )
    if quick:
        print("\n(--quick: resnet18 only, 32x32 synthetic inputs, fewer iterations)")
    return {key: results[key] for key in JSON_KEYS + REFERENCE_KEYS}


_STACK_LABELS = {
    "qatdist_int8": "qatdist int8 (Inductor)",
    "qatdist_int8_aoti": "qatdist int8 AOTI",
    "qatdist_int8_openvino": "qatdist int8 OpenVINO IR",
    "openvino_int8": "OpenVINO int8 (NNCF)",
    "ort_int8": "ORT int8",
    "inductor_fp32": "Inductor fp32",
    "openvino_fp32": "OpenVINO fp32",
    "qatdist_int8_cpp_wrapper": "qatdist int8 cpp_wrapper",
}


_STACK_LABELS_ALWAYS = (
    "qatdist_int8",
    "openvino_int8",
    "ort_int8",
    "inductor_fp32",
    "openvino_fp32",
)


def peers_table(results: dict) -> str:
    """Markdown: one row per model and batch, latency (ms) per stack, int8_vs_best_peer."""
    present = {
        s for latency in results["peer_latency_ms"].values() for ms in latency.values() for s in ms
    }
    stacks = [s for s in _STACK_LABELS if s in present or s in _STACK_LABELS_ALWAYS]
    lines = [
        "| model | batch | "
        + " | ".join(_STACK_LABELS[s] for s in stacks)
        + " | int8_vs_best_peer |",
        "| --- | --- | " + " | ".join("---" for _ in stacks) + " | --- |",
    ]
    for model, latency in results["peer_latency_ms"].items():
        for batch, ms in latency.items():
            cells = [f"{ms[s]:.2f}" if s in ms else "-" for s in stacks]
            ratio = results["int8_vs_best_peer"][model][batch]
            lines.append(
                f"| {model} | {batch} | "
                + " | ".join(cells)
                + " | "
                + ("-" if ratio is None else f"{ratio:.2f}")
                + " |"
            )
    return "\n".join(lines)


def run_peers(
    models: list[str],
    threads: int,
    quick: bool,
    cpp_wrapper: bool = False,
    segmenter: dict | None = None,
) -> dict:
    """The --peers comparison, model after model; prints each as it completes. Returns the
    PEER_JSON_KEYS dict (batch sizes as string keys, as JSON has them). `segmenter`: the
    segmenter rows' `weights` and `frames` (`peers.peer_latency`)."""
    from benchmarks import peers

    results: dict = {key: {} for key in PEER_JSON_KEYS}
    results["peer_versions"] = peers.versions()
    print(
        "peer versions: "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in results["peer_versions"].items())
    )
    rows = []  # the classifiers' rows, for int8_vs_best_peer_geomean
    for name in models:
        dense = name in peers.SEGMENTATION_MODELS
        frame = SEGMENTER_FRAME if dense else (224, 224)
        _section(
            f"{name}: latency (ms, interleaved medians), {frame[0]}x{frame[1]}, {threads} threads"
            + (f", {peers.SEGMENTER_CLASSES} classes (per-pixel logits)" if dense else "")
        )
        if dense and segmenter:
            print(
                f"  weights: {segmenter.get('weights') or 'random init'}; frames: "
                f"{segmenter.get('frames') or 'Gaussian noise'}"
            )
        r = peers.peer_latency(
            name,
            batch_sizes=SEGMENTER_BATCH_SIZES if dense else PEER_BATCH_SIZES,
            image_size=frame,
            threads=threads,
            rounds=3 if quick else 10,
            stacks=peers.STACKS + (peers.LEVERS if cpp_wrapper else ()),
            progress=lambda line: print(f"  {line}", flush=True),
            **((segmenter or {}) if dense else {}),
        )
        if not dense:
            rows += r["rows"]
        results["peer_latency_ms"][name] = {str(row["batch_size"]): row["ms"] for row in r["rows"]}
        results["int8_vs_best_peer"][name] = {
            str(row["batch_size"]): row["int8_vs_best_peer"] for row in r["rows"]
        }
        results["peer_agreement"][name] = r["agreement"]
        results["peer_skipped"][name] = r["skipped"]
        results["peer_hung"][name] = r["hung"]
        results["fastest_qatdist_artifact"][name] = {
            str(row["batch_size"]): row.get("fastest_qatdist") for row in r["rows"]
        }
        for stack, a in r["agreement"].items():
            kernels = a.get("int8_kernels")
            print(
                f"  {stack}: relative logit error vs eager fp32 {a['rel_error']:.2e} "
                f"(bound {a['bound']}: {'ok' if a['ok'] else 'NOT ok'}), "
                f"{'pixel' if dense else 'top-1'} agreement "
                f"{a['top1_agreement']:.2f} ("
                + (
                    "reported, not judged"
                    if dense and (segmenter or {}).get("weights")
                    else "not judged: random-init logits are near ties"
                )
                + ")"
                + (f"; int8 conv/linear kernels {kernels[0]} of {kernels[1]}" if kernels else "")
            )
        for stack, reason in r["skipped"].items():
            print(f"  {stack}: could not run: {reason}")
        for stack, reason in r["hung"].items():
            print(f"  {stack}: stopped: {reason}")
        for row in r["rows"]:
            ratio = row["int8_vs_best_peer"]
            print(
                f"  batch {row['batch_size']}: "
                + ", ".join(f"{s} {ms:.2f}" for s, ms in row["ms"].items())
                + f"; int8_vs_best_peer {'-' if ratio is None else f'{ratio:.3f}'}"
                + (f" ({row['fastest_qatdist']})" if row.get("fastest_qatdist") else ""),
                flush=True,
            )
    results["int8_vs_best_peer_geomean"] = {
        str(b): v for b, v in peers.geomean_int8_vs_best_peer(rows).items()
    }
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        print("bench.py: --threads must be >= 1", file=sys.stderr)
        return 2
    for flag, value in (
        ("--cpp-wrapper", args.cpp_wrapper),
        ("--segmenter-weights", args.segmenter_weights),
        ("--segmenter-frames", args.segmenter_frames),
    ):
        if value and not args.peers:
            print(f"bench.py: {flag} is a --peers option", file=sys.stderr)
            return 2
    for flag, path, kind in (
        ("--segmenter-weights", args.segmenter_weights, Path.is_file),
        ("--segmenter-frames", args.segmenter_frames, Path.is_dir),
    ):
        if path and not kind(Path(path)):
            print(f"bench.py: {flag}: {path} not found", file=sys.stderr)
            return 2
    plan = make_plan(args)
    known = set(torchvision.models.list_models(module=torchvision.models))
    segmenters = set(torchvision.models.list_models(module=torchvision.models.segmentation))
    named = {m for m in plan.qat_models + plan.int8_models if ":" not in m}
    if unknown := sorted(named - known - segmenters):
        print(f"bench.py: --models: unknown torchvision model(s) {unknown}", file=sys.stderr)
        return 2
    if not args.peers and (dense := sorted(named & segmenters)):
        print(
            f"bench.py: --models: segmenter(s) {dense} are measured by --peers only",
            file=sys.stderr,
        )
        return 2
    info = benchmarks.machine_info()
    print(
        "# qatdist benchmark"
        + (" --peers" if args.peers else "")
        + (" (--quick)" if args.quick else "")
    )
    print(
        f"machine: {info['cpu_model']} ({', '.join(info['cpu_flags']) or 'no AVX-512'}), "
        f"{info['cores_usable']} usable of {info['cpu_count']} CPUs, load average "
        f"{info['loadavg'][0]:.2f}\nversions: torch {info['torch']}, torchvision "
        f"{info['torchvision']}, torchao {info['torchao']}, Python {info['python']}\n"
        f"date: {info['date']}",
        flush=True,
    )
    start = time.perf_counter()
    if args.peers:
        from benchmarks.peers import QatdistStackError

        try:
            models = plan.int8_models
            if not args.models and not args.quick:
                models = models + SEGMENTER_MODELS
            results = run_peers(
                models,
                args.threads,
                args.quick,
                args.cpp_wrapper,
                segmenter={"weights": args.segmenter_weights, "frames": args.segmenter_frames},
            )
        except QatdistStackError as e:  # nothing to compare the peers with
            print(f"bench.py: {e}", file=sys.stderr)
            return 1
        geomean = results["int8_vs_best_peer_geomean"]
        print(
            "\n## Summary (latency ms; int8_vs_best_peer: the fastest qatdist artifact over the "
            "fastest peer int8, < 1: qatdist is faster)\n"
        )
        print(peers_table(results))
        print(
            "\nint8_vs_best_peer geomean: "
            + (", ".join(f"batch {b}: {v:.3f}" for b, v in geomean.items()) or "not measured")
        )
    else:
        results = run(plan, args.threads, args.quick)
        print("\n## Summary\n")
        print(markdown_table(summary_rows(results, {"int8_speedup": plan.int8_models})))
    elapsed = time.perf_counter() - start
    end_load = benchmarks.machine_info()["loadavg"][0]
    print(f"\nwall time {elapsed:.0f} s; load average at the end {end_load:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
