"""Model coverage: every torchvision classifier (and user factories) through qatdist's QAT path.

Each model runs in its own subprocess (isolated from crashes, OOM and Dynamo caches) through the
same code a training run uses: seeded fp32 build (`qatdist.models.build_model`), `capture`,
`prepare_qat`, `QatModel`, a few QAT train steps with fake quant on (`qatdist.step.train_step`
on demo shards through `qatdist.data.train_batches`), the statistics sync (`QatModel.sync`,
world size 1), convert (`QatModel.to_int8`) and Inductor compile with freezing
(`compile_for_inference`). Per model it records pass/fail with the stage and the error's first
line, quantizable layers against quantized ops in the compiled code, int8 vs fp32 compiled
latency side by side, margin-aware agreement of compiled int8 with the converted model, and
seconds per stage.

    python scripts/coverage.py --jobs 1 --out docs/coverage.md --json coverage.json
    python scripts/coverage.py --only resnet18,mobilenet_v3_small qatdist.models:tiny_vit
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

NUM_CLASSES = 10
# Input sizes that work where the default (32) does not: inception_v3 needs >= 75 px (built
# without its auxiliary classifier by `build_model`; run at its design size here), AlexNet's
# last max-pool needs >= 63 px, MaxViT's 7x7 partitions need a multiple of 224, a ViT needs a
# multiple of its patch (built at that size via `image_size=`, two patches per side).
SIZE_FOR = {
    "alexnet": 64,
    "inception_v3": 299,
    "maxvit_t": 224,
    "vit_b_16": 32,
    "vit_l_16": 32,
    "vit_h_14": 28,
    "vit_b_32": 64,
    "vit_l_32": 64,
}
# Builders whose fixed input size is a constructor argument (torchvision VisionTransformer).
SIZED_BUILDERS = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"}
# Peak memory of one model's run, in fp32 copies of its parameters (the fp32 model, convert's deep
# copy of the prepared model, the compiled models' frozen and packed weights; gradients, momentum
# and the prepared model are freed before the convert): measured 7.4 on vit_l_16 (8.4 GiB peak
# RSS, 303M parameters, 2026-11-28), rounded up.
PARAM_COPIES_AT_PEAK = 8
MEMORY_BUDGET_BYTES = 20 * 2**30  # of this machine's 24 GiB, leaving room for the rest
# Causes of failures seen in sweeps, matched on (stage, text in the error's first line), so the
# table says who has to fix each: qatdist, or upstream (with where).
KNOWN_CAUSES = (
    (
        "compile",
        "Output size is too small",
        "upstream (torch Inductor, fx_passes/quantization.py): the int8 max-pool lowering's "
        "low-memory pattern binds `ceil_mode` to its `offset_dtype` argument, so ceil-mode "
        "pooling is lowered in floor mode; qatdist rewrites such pools (quant/fixes/ceil_pool.py) "
        "except those it warns about (dilation, used indices)",
    ),
    (
        "train",
        "is a view and is being modified inplace",
        "qatdist (quant/kernels/fast_fake_quant.py): a fake quant whose output is a view made "
        "inside its custom autograd Function, on which autograd forbids an in-place op "
        "(googlenet's F.relu(inplace=True) after a BatchNorm the QAT conv-bn-relu pattern does "
        "not fuse, "
        "efficientnet_v2's residual `+=`); fixed: the op returns a tensor of its own",
    ),
    (
        "capture",
        "Output size is too small",
        "the eager model's own forward refuses this input size (a size chosen by coverage.py "
        "too small for it)",
    ),
)
STAGES = ("build", "capture", "prepare", "train", "sync", "convert", "compile", "measure")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# --- one model, in a child process --------------------------------------------------------


def build_fp32(name: str, image_size: int):
    """The seeded fp32 model as qatdist builds it (`build_model`); ViTs get `image_size=`."""
    import torch
    import torchvision

    from qatdist.config import ModelConfig
    from qatdist.models import build_model

    torch.manual_seed(0)
    if name in SIZED_BUILDERS:
        return torchvision.models.get_model(
            name, weights=None, num_classes=NUM_CLASSES, image_size=image_size
        )
    return build_model(ModelConfig(name=name), NUM_CLASSES, image_size=image_size)


def quantizable_layers(model) -> dict[str, int]:
    """Convolutions and linears of an eager model. `nn.MultiheadAttention`'s output projection
    is an `nn.Linear` (counted as one); its input projection is a parameter: one linear when
    packed (`in_proj_weight`), three when q/k/v have their own weights."""
    import torch

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    counts = {"conv": 0, "linear": 0}
    for module in model.modules():
        if isinstance(module, convs):
            counts["conv"] += 1
        elif isinstance(module, torch.nn.Linear):
            counts["linear"] += 1
        elif isinstance(module, torch.nn.MultiheadAttention):
            counts["linear"] += 1 if module.in_proj_weight is not None else 3
    return counts


class _Stages:
    """Times each stage into `row["seconds"]` and writes the current stage to `progress`, so
    the parent can name the stage of a process that crashed or timed out."""

    def __init__(self, row: dict, progress: Path):
        self.row, self.progress = row, progress

    def __call__(self, name: str):
        self.row["stage"] = name
        self.progress.write_text(name)
        return _Timer(self.row["seconds"], name)


class _Timer:
    def __init__(self, seconds: dict, name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.name] = round(time.perf_counter() - self.start, 2)


def _demo_data(shards: dict, image_size: int):
    from qatdist.config import DataConfig

    return DataConfig(
        train_shards=shards["train"],
        val_shards=shards["val"],
        image_size=image_size,
        num_classes=NUM_CLASSES,
        num_workers=0,
    )


def run_model(name: str, args: argparse.Namespace, row: dict, stage: _Stages) -> None:
    """The whole flow for one model, filling `row`; raises at the failing stage."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from qatdist.config import Config, QuantConfig
    from qatdist.data import train_batches, val_batches
    from qatdist.optim import build_optimizer
    from qatdist.quant import QatModel, capture, compile_for_inference
    from qatdist.quant.inspect import constant_layers, count_quantized_ops
    from qatdist.step import train_step
    from qatdist.tasks.classification import Classification
    from qatdist.tasks.evaluate import outputs_over, side_by_side_latency_ms

    size, batch = row["image_size"], args.batch_size
    data = _demo_data(json.loads(args.shards), size)
    task = Classification(data)
    quant_cfg = QuantConfig()  # fake quant on from step 0, as the default schedule
    with stage("build"):
        fp32 = build_fp32(name, size)
        layers = quantizable_layers(fp32)
        row["layers"] = layers
        row["params_m"] = round(sum(p.numel() for p in fp32.parameters()) / 1e6, 2)
    with stage("capture"):
        graph = capture(copy.deepcopy(fp32), torch.randn(2, 3, size, size))
    # Layers computed from parameters only stay fp32 and are folded by freezing: not expected
    # among the int8 kernels.
    row["constant_layers"] = {k: len(v) for k, v in constant_layers(graph).items()}
    with stage("prepare"):
        model = QatModel.from_captured(fp32, graph, quant_cfg)
    with stage("train"):
        cfg = Config()
        optimizer = build_optimizer(model.parameters(), cfg.optim, lr=cfg.train.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        batches = train_batches(
            data, task, batch_size=batch, steps=args.steps, rank=0, world_size=1, seed=0, epoch=0
        )
        for images, labels, _ in batches:
            loss, _ = train_step(model.prepared, optimizer, scheduler, task, images, labels)
        row["last_loss"] = round(loss, 4)
        # Gradients and momentum are two fp32 copies of the weights: gone before the convert
        # and compiles, so that the largest models fit (see PARAM_COPIES_AT_PEAK).
        del optimizer, scheduler
        model.prepared.zero_grad(set_to_none=True)
    with stage("sync"):
        model.sync()
    with stage("convert"):
        int8 = model.to_int8()
        del model  # the prepared copy: not needed once converted
    # Random ops left in the eval-mode int8 graph (a mask the eval switch did not make all
    # ones): compiled and converted models would then disagree by chance, not by rounding.
    row["random_ops"] = sum(
        n.op == "call_function"
        and "bernoulli" in str(n.target)
        and n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5) != 1.0
        for n in int8.graph.nodes
    )
    example = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with stage("compile"), torch.no_grad():
        int8_compiled = compile_for_inference(int8)
        _, codes = run_and_get_code(int8_compiled, example)  # resets Dynamo: the first compile
        fp32_compiled = compile_for_inference(fp32.eval())
        fp32_compiled(example)
    found = count_quantized_ops("\n".join(codes))
    row["quantized"] = found
    row["all_quantized"] = all(found[k] >= _expected_int8(row, k) for k in layers)
    with stage("measure"), torch.no_grad():
        ms = side_by_side_latency_ms(
            {"fp32": fp32_compiled, "int8": int8_compiled}, example, args.latency_iters
        )
        row["fp32_ms"], row["int8_ms"] = round(ms["fp32"], 3), round(ms["int8"], 3)
        row["speedup"] = round(ms["fp32"] / ms["int8"], 3)
        meter = task.new_agreement()
        for _, _, out in outputs_over(
            {"reference": int8, "compiled": int8_compiled},
            val_batches(data, task, batch_size=batch, rank=0, world_size=1),
            pad_to=batch,
        ):
            meter.update(out["reference"], out["compiled"])
        row["agree"], row["comparable"] = meter.counts()
        row["max_logit_diff"] = round(meter.max_abs_diff, 5)
        row["max_abs_logit"] = round(meter.output_scale, 5)  # the scale the diff is judged by


def child_main(args: argparse.Namespace) -> int:
    """Run one model and write its row as JSON to `args.row_out`; exit 0 either way."""
    import torch

    torch.set_num_threads(args.threads)
    row = json.loads(args.row_in)
    row["seconds"] = {}
    stage = _Stages(row, Path(args.row_out + ".stage"))
    try:
        run_model(row["model"], args, row, stage)
        row["status"] = "passed"
        row["stage"] = ""
    except Exception as e:  # any failure is a row, with the stage it happened in
        row["status"], row["error"] = "failed", _first_line(e)
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    row["seconds"]["total"] = round(sum(row["seconds"].values()), 2)
    # Peak resident memory of this model's process (Linux reports KiB): what calibrates
    # PARAM_COPIES_AT_PEAK, the estimate that skips models too large for the machine.
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    Path(args.row_out).write_text(json.dumps(row))
    return 0


# --- the sweep, in the parent -------------------------------------------------------------


def param_count(name: str) -> int | None:
    """Parameters of a model, built on the meta device (no memory, no time) or, where its
    builder computes with tensors (RegNet's widths), on the CPU; None when it cannot be built
    (its run reports why)."""
    import torch

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build_fp32(name, SIZE_FOR.get(name, 32))
            return sum(p.numel() for p in model.parameters())
        except Exception:  # the child will report the real error at its build stage
            continue
    return None


def plan_rows(args: argparse.Namespace) -> list[dict]:
    """One row per selected model, smallest first, with too-large and --skip rows marked."""
    import torchvision

    names = list(torchvision.models.list_models(module=torchvision.models)) + list(args.factories)
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in names]
        names = [n for n in names if n in wanted] + unknown  # unknown names fail at build
    skip = set(args.skip.split(",")) if args.skip else set()
    rows = []
    for name in names:
        params = param_count(name)
        size = SIZE_FOR.get(name, args.image_size)
        row = {"model": name, "image_size": size, "params_m": params and round(params / 1e6, 2)}
        if name in skip:
            row |= {"status": "skipped", "error": "skipped by --skip"}
        elif params and params * 4 * PARAM_COPIES_AT_PEAK > MEMORY_BUDGET_BYTES:
            need = params * 4 * PARAM_COPIES_AT_PEAK / 2**30
            row |= {
                "status": "skipped",
                "error": f"too large: {params / 1e6:.0f}M parameters, about {need:.0f} GiB at "
                f"peak ({PARAM_COPIES_AT_PEAK} fp32 copies) > {MEMORY_BUDGET_BYTES // 2**30} GiB",
            }
        rows.append(row)
    rows.sort(key=lambda r: (r.get("params_m") is None, r.get("params_m") or 0))
    return rows


def run_child(row: dict, args: argparse.Namespace, work: Path) -> dict:
    """Run one model in a subprocess with the per-model timeout; a crash, OOM kill or timeout
    becomes a failed row naming the stage it was in."""
    out = work / f"{row['model'].replace(':', '_').replace('.', '_')}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--row-in={json.dumps(row)}",
        f"--row-out={out}",
        f"--shards={args.shards}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--latency-iters={args.latency_iters}",
        f"--threads={args.threads}",
    ]
    start = time.perf_counter()
    log = work / (out.stem + ".log")
    try:
        with open(log, "w") as log_file:
            proc = subprocess.run(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.timeout
            )
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    if out.exists():
        return json.loads(out.read_text())
    stage_file = Path(str(out) + ".stage")
    stage = stage_file.read_text() if stage_file.exists() else "start"
    if returncode is None:
        error = f"timeout: no result within {args.timeout} s"
    else:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = f"process exited with code {returncode}" + (f": {tail[-1][:200]}" if tail else "")
    seconds = {"total": round(time.perf_counter() - start, 2)}
    return row | {"status": "failed", "stage": stage, "error": error, "seconds": seconds}


def write_demo(work: Path) -> str:
    """Small demo shards (32 px; the transforms resize to each model's size) as JSON paths."""
    from qatdist.data.demo import write_demo_shards

    train, val = write_demo_shards(
        work / "shards", train_per_class=8, val_per_class=4, seed=0, image_size=32, shard_size=40
    )
    return json.dumps({"train": train, "val": val})


def sweep(args: argparse.Namespace) -> list[dict]:
    """Run every planned row (parallel `--jobs`), printing each as it finishes. After
    `--budget` seconds no new model starts; rows not reached say so."""
    rows = plan_rows(args)
    todo = [r for r in rows if "status" not in r]
    done: dict[str, dict] = {r["model"]: r for r in rows if "status" in r}
    for row in rows:
        if "status" in row:
            print(f"{row['model']}: {row['status']}, {row['error']}", flush=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qatdist-coverage-") as tmp:
        work = Path(tmp)
        args.shards = write_demo(work)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {}
            pending = list(todo)
            while pending or futures:
                while pending and len(futures) < args.jobs:
                    row = pending.pop(0)
                    if args.budget and time.monotonic() - start > args.budget:
                        reason = f"not run in this sweep: time budget of {args.budget} s spent"
                        done[row["model"]] = row | {"status": "not run", "error": reason}
                        continue
                    futures[pool.submit(run_child, row, args, work)] = row["model"]
                if not futures:
                    break
                finished, _ = concurrent.futures.wait(
                    futures, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    result = future.result()
                    done[futures.pop(future)] = result
                    print(progress_line(result, len(done), len(rows)), flush=True)
                    if args.json:  # kept current, so an interrupted sweep still has its rows
                        save_rows(args, [done.get(r["model"], r) for r in rows])
    return [done[r["model"]] for r in rows]


SETTINGS = ("command", "steps", "batch_size", "latency_iters", "threads")


def save_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows and the sweep's settings (what `--render` needs for the header) as JSON."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


def load_rows(args: argparse.Namespace) -> list[dict]:
    """Rows of an earlier `--json`, its settings copied into `args`; rows the sweep never
    reached are marked "not run"."""
    saved = json.loads(Path(args.render).read_text())
    for key in SETTINGS:
        setattr(args, key, saved["settings"][key])
    for row in saved["rows"]:
        if "status" not in row:
            row["status"] = "not run"
            row["error"] = "not run in this sweep: the sweep stopped before it"
    return saved["rows"]


def progress_line(row: dict, count: int, total: int) -> str:
    head = f"[{count}/{total}] {row['model']} ({row['image_size']} px): {row['status']}"
    if row["status"] == "passed":
        q, layers = row["quantized"], row["layers"]
        return (
            f"{head}, conv {q['conv']}/{layers['conv']}, linear {q['linear']}/{layers['linear']}, "
            f"int8 x{row['speedup']:.2f}, {row['seconds']['total']:.0f} s"
        )
    return f"{head} at {row.get('stage', '-')}: {row.get('error', '')}"


# --- the markdown table -------------------------------------------------------------------


def known_cause(row: dict) -> str:
    """The explanation of a failure from `KNOWN_CAUSES`, or ''."""
    for stage, text, cause in KNOWN_CAUSES:
        if row.get("stage") == stage and text in (row.get("error") or ""):
            return cause
    return ""


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _expected_int8(row: dict, kind: str) -> int:
    """Layers of `kind` that should run int8: all but those computed from parameters only."""
    return row["layers"][kind] - (row.get("constant_layers") or {}).get(kind, 0)


def table_row(row: dict) -> str:
    layers, q, s = row.get("layers") or {}, row.get("quantized") or {}, row.get("seconds") or {}

    def ratio(kind: str) -> str:
        if kind not in layers:
            return "-"
        folded = (row.get("constant_layers") or {}).get(kind, 0)
        text = f"{q.get(kind, '-')}/{_expected_int8(row, kind)}"
        return text + (f" (+{folded} folded)" if folded else "")

    agree = f"{row['agree']}/{row['comparable']}" if "comparable" in row else "-"
    diff = "-"
    if "max_logit_diff" in row:
        diff = f"{row['max_logit_diff']:.3g} / {_cell(row.get('max_abs_logit'), '{:.3g}')}"
    cause = known_cause(row) if row["status"] == "failed" else ""
    note = (row.get("error") or "") + (f". Cause: {cause}" if cause else "")
    if row["status"] == "passed" and not row.get("all_quantized"):
        short = {k: _expected_int8(row, k) - q[k] for k in layers if q[k] < _expected_int8(row, k)}
        note += "not int8: " + ", ".join(f"{n} {k}" for k, n in short.items()) + ". "
    if row.get("random_ops"):
        note += (
            f"int8 graph keeps {row['random_ops']} random ops (masks captured in train mode "
            "that the eval switch left random): agreement is by chance"
        )
    note = note.replace("|", "\\|")
    cells = [
        row["model"],
        str(row["image_size"]),
        _cell(row.get("params_m"), "{:.1f}"),
        row["status"],
        row.get("stage") or "-",
        ratio("conv"),
        ratio("linear"),
        _cell(row.get("fp32_ms"), "{:.1f}"),
        _cell(row.get("int8_ms"), "{:.1f}"),
        _cell(row.get("speedup"), "{:.2f}x"),
        agree,
        diff,
        *(_cell(s.get(k), "{:.0f}") for k in ("capture", "prepare", "train", "convert")),
        _cell(s.get("compile"), "{:.0f}"),
        _cell(s.get("total"), "{:.0f}"),
        note,
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | px | params (M) | result | failed stage | int8 conv / conv | int8 linear / linear "
    "| fp32 ms | int8 ms | int8 speedup | agree / comparable | logit diff / max logit "
    "| capture s | prepare s | train s | convert s | compile s | total s | error or reason |"
)


def totals(rows: list[dict]) -> dict[str, int]:
    out = {"passed": 0, "failed": 0, "skipped": 0, "not run": 0}
    for row in rows:
        out[row["status"]] += 1
    return out


def markdown(rows: list[dict], args: argparse.Namespace, machine: dict) -> str:
    t = totals(rows)
    fully = sum(r["status"] == "passed" and r.get("all_quantized") for r in rows)
    flags = ", ".join(machine["cpu_flags"]) or "none"
    lines = [
        "# Model coverage",
        "",
        "Every torchvision classifier through qatdist's QAT path: capture, prepare_qat, "
        f"{args.steps} QAT train steps (fake quant on, batch {args.batch_size}, demo data), "
        "statistics sync, convert, Inductor compile with freezing. Written by "
        "`scripts/coverage.py`.",
        "",
        f"- Command: `{args.command}`",
        f"- Machine: {machine['cpu_model']}, {machine['cores_usable']} usable cores, "
        f"{args.threads} torch thread(s) per model; ISA: {flags}",
        f"- Versions: torch {machine['torch']}, torchao {machine['torchao']}, torchvision "
        f"{machine['torchvision']}, Python {machine['python']}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- **Totals: {t['passed']} passed end to end ({fully} with every conv/linear int8), "
        f"{t['failed']} failed, {t['skipped']} skipped, {t['not run']} not run in this sweep, "
        f"of {len(rows)}.**",
        "",
        "Columns: int8 conv / conv and int8 linear / linear are quantized kernel calls found in "
        "the compiled int8 code against the fp32 model's conv and linear layers (a "
        'MultiheadAttention\'s packed input projection counts as one linear); "+N folded": '
        "layers that compute from parameters only (swin_v2's position-bias MLP), kept fp32 and "
        "folded to constants by freezing, so not expected as int8 kernels. Latency: compiled "
        f"int8 vs compiled fp32 at batch {args.batch_size}, median of {args.latency_iters} "
        "interleaved runs. agree / comparable: compiled int8 vs the converted model's top-1, "
        "judged only where the converted model's top-2 margin exceeds the measured logit "
        "difference (few steps of training leave most predictions near ties); logit diff / max "
        "logit: the largest |compiled - converted| logit difference against the largest "
        "|logit| of the converted model (BatchNorm statistics barely trained make some logits "
        "large). Seconds per stage; "
        "total includes build, sync and the measurements.",
        "",
        HEADER,
        "|" + " --- |" * (HEADER.count("|") - 1),
        *(table_row(r) for r in rows),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "factories",
        nargs="*",
        help="extra models: 'package.module:function' or 'path/to/file.py:function' factories",
    )
    parser.add_argument("--only", default="", help="comma-separated models to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated models listed as skipped")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel processes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument(
        "--budget", type=float, default=0, help="seconds after which no new model starts (0: none)"
    )
    parser.add_argument("--image-size", type=int, default=32, help="default input size (px)")
    parser.add_argument("--steps", type=int, default=3, help="QAT train steps per model")
    parser.add_argument("--batch-size", type=int, default=8, help="train and latency batch")
    parser.add_argument("--latency-iters", type=int, default=5, help="timed latency runs")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per model (0: cores / jobs)"
    )
    parser.add_argument("--out", default="", help="write the markdown table here")
    parser.add_argument("--json", default="", help="write the raw rows here (JSON)")
    parser.add_argument(
        "--render",
        default="",
        help="write --out from the rows of an earlier --json (rows never reached: 'not run')",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row-in", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.steps < 1 or args.batch_size < 1 or args.latency_iters < 1:
        parser.error("--jobs, --steps, --batch-size and --latency-iters must be >= 1")
    if args.threads == 0:
        args.threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    # machine_info lives in the repo's top-level benchmarks/ package, beside scripts/.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.machine import machine_info

    args.command = shlex.join(["python", "scripts/coverage.py", *argv])
    if args.render:
        rows = load_rows(args)
    else:
        rows = sweep(args)
    t = totals(rows)
    print(
        f"totals: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
        f"{t['not run']} not run, of {len(rows)}"
    )
    if args.json and not args.render:
        save_rows(args, rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(rows, args, machine_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
