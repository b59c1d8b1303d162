"""DDP scaling: N ranks x 1 thread against 1 rank x N threads, real gloo processes, same global
batch, qatdist's prepared model under `wrap_ddp`."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import bound_train_step, qat_model, synthetic_batch
from qatdist.distributed import wrap_ddp


@dataclass(frozen=True)
class DdpJob:
    """What every rank of one configuration trains, and for how long."""

    model_name: str
    image_size: int
    warmup: int
    steps: int
    seed: int


@dataclass(frozen=True)
class DdpLayout:
    """How one configuration is laid out: rank r pinned to `cpus[r]` with `threads` threads,
    `local_batch` images per rank, gradients all-reduced with `grad_compression`."""

    world_size: int
    threads: int
    cpus: list[list[int]]
    local_batch: int
    grad_compression: str = "none"


def _ddp_worker(rank: int, job: DdpJob, layout: DdpLayout, init_file: str, result_file: str):
    """One DDP rank: pin, start gloo, train qatdist's prepared model on synthetic data; rank 0
    writes the throughput to `result_file`."""
    os.sched_setaffinity(0, layout.cpus[rank])
    torch.set_num_threads(layout.threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=layout.world_size
    )
    try:
        model = qat_model(job.model_name, job.seed, job.image_size).prepared
        step = bound_train_step(wrap_ddp(model, layout.grad_compression))
        images, labels = synthetic_batch(layout.local_batch, job.image_size, job.seed + 1 + rank)
        for _ in range(job.warmup):
            step(images, labels)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(job.steps):
            step(images, labels)
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            result = {
                "images_per_s": job.steps * layout.local_batch * layout.world_size / elapsed,
                "step_ms": elapsed / job.steps * 1000,
                "cpus": layout.cpus,
                "threads": torch.get_num_threads(),
            }
            Path(result_file).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _ddp_run(job: DdpJob, layout: DdpLayout) -> dict:
    """Spawn the ranks of `layout` for `job`; returns rank 0's throughput record."""
    with tempfile.TemporaryDirectory(prefix="qatdist-bench-ddp-") as tmp:
        init_file, result_file = f"{tmp}/init", f"{tmp}/result.json"
        args = (job, layout, init_file, result_file)
        mp.spawn(_ddp_worker, args=args, nprocs=layout.world_size, join=True)
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
    job = DdpJob(model_name, image_size, warmup, steps, seed)
    one_core_each = [[c] for c in cores]
    layouts = {
        "multi": DdpLayout(ranks, 1, one_core_each, global_batch // ranks),
        "multi_bf16": DdpLayout(ranks, 1, one_core_each, global_batch // ranks, "bf16"),
        "single": DdpLayout(1, ranks, [cores], global_batch),
    }
    runs: dict[str, list[dict]] = {name: [] for name in layouts}
    for _ in range(rounds):
        for name, layout in layouts.items():
            runs[name].append(_ddp_run(job, layout))
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
