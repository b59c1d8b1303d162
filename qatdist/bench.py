"""Benchmark figures of qatdist, each a ratio of two timings measured side by side in one run.

Every figure times its two sides interleaved (A, B, A, B, ...) in the same process or, for DDP
scaling, alternates the two configurations, so that noise from other work on the machine hits
both sides alike. Absolute timings are printed for context only; the ratios are the result.
`scripts/bench.py` is the command line; the functions here are also used by the tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from queue import Empty
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchao
import torchvision

from qatdist import config as qconfig
from qatdist.config import Config, ModelConfig, QuantConfig
from qatdist.distributed import DistEnv, wrap_ddp
from qatdist.evaluate import side_by_side_latency_ms
from qatdist.models import build_model
from qatdist.optim import build_optimizer
from qatdist.quant import QatModel
from qatdist.quant.capture import make_call_sites_distinct
from qatdist.quant.convert import compile_for_inference
from qatdist.step import train_step

NUM_CLASSES = 10
JSON_KEYS = (
    "qat_step_ratio",
    "ddp_scaling_ratio",
    "int8_speedup",
    "int8_speedup_geomean",
    "data_wait_fraction",
    "final_model_vs_hand_flow",
)
# Written after the contract keys: the same measurements with a lever switched, for reference
# (QAT with torchao's own fake-quant op; DDP with runtime.grad_compression = "bf16").
REFERENCE_KEYS = ("qat_step_ratio_torchao_op", "ddp_scaling_ratio_bf16_grads")


def machine_info() -> dict:
    """CPU model, usable cores, ISA flags that matter for int8, versions, date and load."""
    cpu_model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model is None:
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cpu_model = cpu_model or platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return {
        "cpu_model": cpu_model,
        "cpu_flags": [f for f in wanted if f in flags],
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchao": torchao.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
    }


def _seeded_model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name), NUM_CLASSES)


def _qat_model(name: str, seed: int, image_size: int, fast_fake_quant: bool = True) -> QatModel:
    """qatdist's QAT model (`QatModel.build`), in the default schedule's phase at step 0: fake
    quant on, observers on, BatchNorm not frozen. `fast_fake_quant=False` keeps torchao's
    fake-quant op (the reference the fast kernels are measured against)."""
    quant_cfg = QuantConfig(fast_fake_quant=fast_fake_quant)
    return QatModel.build(
        ModelConfig(name=name),
        quant_cfg,
        num_classes=NUM_CLASSES,
        image_size=image_size,
        seed=seed,
    )


def _batch(batch_size: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return images, labels


def _train_step_fn(model: torch.nn.Module):
    """The trainer's own `train_step` (forward, loss, backward, SGD step, LR step) bound to
    `model`, so the benchmark times exactly the code a training run executes."""
    optimizer = build_optimizer(model.parameters(), Config())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return functools.partial(train_step, model, optimizer, scheduler)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def qat_step_ratio(
    model_name: str,
    *,
    image_size: int = 64,
    batch_size: int = 32,
    threads: int = 2,
    warmup: int = 3,
    iters: int = 10,
    seed: int = 0,
) -> dict:
    """QAT train step time / fp32 eager train step time for `model_name` (same seed, same batch,
    steps interleaved after warm-up, medians). Returns timings (ms) and the ratio."""
    torch.set_num_threads(threads)
    fp32 = _seeded_model(model_name, seed).train()
    qat = _qat_model(model_name, seed, image_size).prepared
    torchao_op = _qat_model(model_name, seed, image_size, fast_fake_quant=False).prepared
    steps = {
        "fp32": _train_step_fn(fp32),
        "qat": _train_step_fn(qat),
        "qat_torchao_op": _train_step_fn(torchao_op),
    }
    images, labels = _batch(batch_size, image_size, seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            elapsed = _timed(step, images, labels)
            if i >= warmup:
                times[name].append(elapsed * 1000)
    fp32_ms, qat_ms = statistics.median(times["fp32"]), statistics.median(times["qat"])
    torchao_op_ms = statistics.median(times["qat_torchao_op"])
    return {
        "model": model_name,
        "shape": [batch_size, 3, image_size, image_size],
        "threads": threads,
        "iters": iters,
        "qat_ms": qat_ms,
        "fp32_ms": fp32_ms,
        "ratio": qat_ms / fp32_ms,
        "qat_torchao_op_ms": torchao_op_ms,
        "ratio_torchao_op": torchao_op_ms / fp32_ms,
    }


def _ddp_worker(
    rank: int,
    world_size: int,
    init_file: str,
    result_file: str,
    cpus: list[list[int]],
    threads: int,
    model_name: str,
    image_size: int,
    local_batch: int,
    warmup: int,
    steps: int,
    seed: int,
    grad_compression: str,
) -> None:
    """One DDP rank: pin, start gloo, train qatdist's prepared model on synthetic data."""
    os.sched_setaffinity(0, cpus[rank])
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = _qat_model(model_name, seed, image_size).prepared
        step = _train_step_fn(wrap_ddp(model, grad_compression))
        images, labels = _batch(local_batch, image_size, seed + 1 + rank)
        for _ in range(warmup):
            step(images, labels)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step(images, labels)
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            result = {
                "images_per_s": steps * local_batch * world_size / elapsed,
                "step_ms": elapsed / steps * 1000,
                "cpus": cpus,
                "threads": torch.get_num_threads(),
            }
            Path(result_file).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _ddp_run(
    world_size: int,
    threads: int,
    cpus: list[list[int]],
    local_batch: int,
    job,
    grad_compression: str = "none",
) -> dict:
    """Spawn `world_size` ranks (rank r pinned to `cpus[r]`, `threads` threads each) for the
    model and step counts in `job`; returns rank 0's throughput record."""
    with tempfile.TemporaryDirectory(prefix="qatdist-bench-ddp-") as tmp:
        init_file, result_file = f"{tmp}/init", f"{tmp}/result.json"
        args = (world_size, init_file, result_file, cpus, threads, job.model_name)
        args += (job.image_size, local_batch, job.warmup, job.steps, job.seed, grad_compression)
        mp.spawn(_ddp_worker, args=args, nprocs=world_size, join=True)
        return json.loads(Path(result_file).read_text())


def ddp_scaling_ratio(
    *,
    model_name: str = "resnet18",
    ranks: int = 2,
    image_size: int = 32,
    global_batch: int = 64,
    rounds: int = 2,
    warmup: int = 3,
    steps: int = 10,
    seed: int = 0,
) -> dict:
    """Training throughput of `ranks` ranks x 1 thread (each pinned to its own core) over 1 rank
    x `ranks` threads (pinned to the same cores), same global batch, qatdist's prepared model
    under `wrap_ddp` over gloo in real processes. The configurations alternate `rounds` times;
    the median throughput of each is used. `ratio` is with the default fp32 gradient
    all-reduce, `ratio_bf16_grads` with `runtime.grad_compression = "bf16"`."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < ranks:
        raise RuntimeError(f"ddp scaling needs {ranks} usable CPUs, this process has {allowed}")
    if global_batch % ranks:
        raise ValueError(f"global batch {global_batch} is not divisible by {ranks} ranks")
    cores = allowed[:ranks]
    job = SimpleNamespace(
        model_name=model_name, image_size=image_size, warmup=warmup, steps=steps, seed=seed
    )
    runs: dict[str, list[dict]] = {"multi": [], "multi_bf16": [], "single": []}
    for _ in range(rounds):
        one_core_each = [[c] for c in cores]
        local_batch = global_batch // ranks
        runs["multi"].append(_ddp_run(ranks, 1, one_core_each, local_batch, job))
        runs["multi_bf16"].append(_ddp_run(ranks, 1, one_core_each, local_batch, job, "bf16"))
        runs["single"].append(_ddp_run(1, ranks, [cores], global_batch, job))
    multi, multi_bf16, single = (
        statistics.median(r["images_per_s"] for r in runs[name])
        for name in ("multi", "multi_bf16", "single")
    )
    return {
        "model": model_name,
        "shape": [global_batch, 3, image_size, image_size],
        "multi": f"{ranks} ranks x 1 thread, cores {cores}, batch {ranks}x{global_batch // ranks}",
        "single": f"1 rank x {ranks} threads, cores {cores}, batch 1x{global_batch}",
        "rounds": rounds,
        "steps": steps,
        "multi_images_per_s": multi,
        "single_images_per_s": single,
        "multi_each": [r["images_per_s"] for r in runs["multi"]],
        "single_each": [r["images_per_s"] for r in runs["single"]],
        "ratio": multi / single,
        "multi_bf16_grads_images_per_s": multi_bf16,
        "ratio_bf16_grads": multi_bf16 / single,
    }


def _calibrate(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Training-mode forwards (observers on) so every observer has a range."""
    with torch.no_grad():
        for images in batches:
            model(images)


def _calibration_batches(n: int, batch_size: int, image_size: int, seed: int) -> list:
    return [_batch(batch_size, image_size, seed + 100 + i)[0] for i in range(n)]


def _compile_and_warm(model: torch.nn.Module, example: torch.Tensor, compile_fn) -> tuple:
    start = time.perf_counter()
    compiled = compile_fn(model)
    with torch.no_grad():
        compiled(example)
    return compiled, time.perf_counter() - start


def int8_speedup(
    model_name: str,
    *,
    image_size: int = 64,
    batch_size: int = 32,
    threads: int = 2,
    calib_batches: int = 4,
    iters: int = 20,
    seed: int = 0,
) -> dict:
    """fp32 compiled latency / int8 compiled latency: int8 through qatdist's flow (capture,
    prepare_qat, calibration forwards, convert_to_int8, compile_for_inference), fp32 the same
    seeded eager model in eval mode through compile_for_inference; interleaved medians."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    qat = _qat_model(model_name, seed, image_size)
    _calibrate(qat.prepared, _calibration_batches(calib_batches, batch_size, image_size, seed))
    int8 = qat.to_int8()
    fp32 = _seeded_model(model_name, seed).eval()
    example = _batch(batch_size, image_size, seed)[0]
    int8_c, int8_compile_s = _compile_and_warm(int8, example, compile_for_inference)
    fp32_c, fp32_compile_s = _compile_and_warm(fp32, example, compile_for_inference)
    latency = side_by_side_latency_ms({"fp32": fp32_c, "int8": int8_c}, example, iters)
    return {
        "model": model_name,
        "shape": list(example.shape),
        "threads": threads,
        "iters": iters,
        "fp32_ms": latency["fp32"],
        "int8_ms": latency["int8"],
        "compile_s": {"int8": int8_compile_s, "fp32": fp32_compile_s},
        "ratio": latency["fp32"] / latency["int8"],
    }


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _data_wait_worker(
    model_name: str,
    data_cfg: qconfig.DataConfig,
    runtime_cfg: qconfig.RuntimeConfig,
    batch_size: int,
    warmup: int,
    steps: int,
    seed: int,
    queue,
) -> None:
    """One training process placed as the trainer places a single rank (its compute cores and
    its loader core), pulling batches from `data.train_batches` with the trainer's worker
    pinning; times how long each `next()` blocks and each train step takes."""
    from qatdist import data, topology

    placement = topology.place_this_rank(runtime_cfg, DistEnv(0, 1, 0, 1, 0))
    loader_cpus = placement.placement.loader_cpus
    worker_init = None
    if placement.pinning:
        worker_init = functools.partial(topology.pin_loader_worker, list(loader_cpus))
    model = _qat_model(model_name, seed, data_cfg.image_size).prepared
    step = _train_step_fn(model)
    batches = data.train_batches(
        data_cfg,
        batch_size=batch_size,
        steps=warmup + steps,
        rank=0,
        world_size=1,
        seed=seed,
        epoch=0,
        worker_init_fn=worker_init,
    )
    waits, computes = [], []
    it = iter(batches)
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(it)
        got = time.perf_counter()
        step(batch.images, batch.labels)
        done = time.perf_counter()
        if i >= warmup:
            waits.append(got - start)
            computes.append(done - got)
    for _ in it:  # let the loader finish and stop its workers
        pass
    queue.put(
        {
            "wait_s": sum(waits),
            "step_s": sum(computes),
            "cpus": placement.placement.cpus,
            "loader_cpus": loader_cpus,
            "threads": placement.torch_threads,
        }
    )


def _result_or_exit(queue, proc) -> dict:
    """The child's result, or RuntimeError as soon as it has died without one."""
    while True:
        try:
            return queue.get(timeout=2)
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"data-wait benchmark process exited with code {proc.exitcode}"
                ) from None


def data_wait_fraction(
    *,
    model_name: str = "resnet18",
    config_path: str | None = None,
    image_size: int | None = None,
    demo_per_class: int = 40,
    shard_size: int = 50,
    batch_size: int = 32,
    warmup: int = 5,
    steps: int = 30,
    seed: int = 0,
) -> dict:
    """Fraction of step time (wait + compute) a single training process spends blocked on the
    next batch, with the data section of `config_path` (default: configs/default.toml) pointed
    at small demo shards generated in a temp dir at its image size (or `image_size`)."""
    from qatdist.demo import write_demo_shards

    cfg = qconfig.load(config_path)
    if image_size is not None:
        cfg.data = dataclasses.replace(cfg.data, image_size=image_size)
    with tempfile.TemporaryDirectory(prefix="qatdist-bench-data-") as tmp:
        train, val = write_demo_shards(
            tmp,
            train_per_class=demo_per_class,
            val_per_class=1,
            seed=seed,
            image_size=cfg.data.image_size,
            shard_size=shard_size,
        )
        data_cfg = dataclasses.replace(
            cfg.data, train_shards=train, val_shards=val, generate_demo=False
        )
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        args = (model_name, data_cfg, cfg.runtime, batch_size, warmup, steps, seed, queue)
        proc = ctx.Process(target=_data_wait_worker, args=args)
        proc.start()
        result = _result_or_exit(queue, proc)
        proc.join()
    total = result["wait_s"] + result["step_s"]
    return {
        "model": model_name,
        "shape": [batch_size, 3, data_cfg.image_size, data_cfg.image_size],
        "num_workers": data_cfg.num_workers,
        "steps": steps,
        **result,
        "fraction": result["wait_s"] / total,
    }


def _hand_flow_prepare(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The notes' plain recipe up to prepare: static export, distinct ReLU call sites (the
    plain flow fails without), the stock X86InductorQuantizer QAT config, prepare_qat_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    graph_module = torch.export.export(model, (example,)).module()
    make_call_sites_distinct(graph_module)
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    return prepare_qat_pt2e(graph_module, quantizer)


def _hand_flow_finish(prepared: torch.nn.Module) -> torch.nn.Module:
    import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted


def _hand_flow_compile(model: torch.nn.Module) -> torch.nn.Module:
    torch._inductor.config.freezing = True
    return torch.compile(model)


def same_weights_int8_pair(
    model_name: str, example: torch.Tensor, *, calib_batches: int = 4, seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(qatdist's converted int8 model, the hand flow's) with the same weights: both prepared
    from the same seeded model, qatdist's calibrated on seeded batches of `example`'s shape and
    its prepared state dict loaded (strictly) into the hand flow's before each converts."""
    batch_size, _, image_size, _ = example.shape
    ours = _qat_model(model_name, seed, image_size)
    _calibrate(ours.prepared, _calibration_batches(calib_batches, batch_size, image_size, seed))
    hand = _hand_flow_prepare(_seeded_model(model_name, seed), example)
    hand.load_state_dict(ours.state_dict(), strict=True)
    return ours.to_int8(), _hand_flow_finish(hand)


def final_model_vs_hand_flow(
    *,
    model_name: str = "resnet18",
    image_size: int = 64,
    batch_size: int = 32,
    threads: int = 2,
    calib_batches: int = 4,
    iters: int = 20,
    seed: int = 0,
) -> dict:
    """qatdist's final int8 latency / the hand-written flow's on the same weights
    (`same_weights_int8_pair`), each compiled its own way; interleaved medians."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    example = _batch(batch_size, image_size, seed)[0]
    ours, hand = same_weights_int8_pair(model_name, example, calib_batches=calib_batches, seed=seed)
    ours_c, ours_compile_s = _compile_and_warm(ours, example, compile_for_inference)
    hand_c, hand_compile_s = _compile_and_warm(hand, example, _hand_flow_compile)
    with torch.no_grad():
        agree = (ours_c(example).argmax(1) == hand_c(example).argmax(1)).float().mean().item()
    latency = side_by_side_latency_ms({"qatdist": ours_c, "hand": hand_c}, example, iters)
    return {
        "model": model_name,
        "shape": list(example.shape),
        "threads": threads,
        "iters": iters,
        "qatdist_ms": latency["qatdist"],
        "hand_ms": latency["hand"],
        "compile_s": {"qatdist": ours_compile_s, "hand": hand_compile_s},
        "top1_agreement": agree,
        "ratio": latency["qatdist"] / latency["hand"],
    }


TARGETS = {
    ("qat_step_ratio", "resnet18"): ("<=", 1.15),
    ("qat_step_ratio", "mobilenet_v3_large"): ("<=", 1.25),
    ("ddp_scaling_ratio", None): (">=", 0.90),
    ("int8_speedup", "*"): (">=", 2.0),
    ("int8_speedup_geomean", None): (">=", 3.25),
    ("data_wait_fraction", None): ("<", 0.02),
    ("final_model_vs_hand_flow", None): ("<=", 1.05),
}


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
