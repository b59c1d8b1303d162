"""Data-loader wait: the fraction of step time a training process spends blocked on the next
batch, with the trainer's own placement and loader pinning, on small demo shards."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from queue import Empty

import torch.multiprocessing as mp

from benchmarks.common import bound_train_step, qat_model
from qatdist import config as qconfig
from qatdist import data, topology
from qatdist.data.demo import write_demo_shards
from qatdist.distributed import DistEnv
from qatdist.tasks.classification import Classification


@dataclasses.dataclass(frozen=True)
class DataWaitJob:
    """What the measuring process trains on, and for how long."""

    model_name: str
    data_cfg: qconfig.DataConfig
    runtime_cfg: qconfig.RuntimeConfig
    batch_size: int
    warmup: int
    steps: int
    seed: int


def _data_wait_worker(job: DataWaitJob, queue) -> None:
    """One training process placed as the trainer places a single rank (its compute cores and
    its loader core), pulling batches from `data.train_batches` with the trainer's worker
    pinning; puts how long `next()` blocked and the train steps took on `queue`."""
    placement = topology.place_this_rank(job.runtime_cfg, DistEnv(0, 1, 0, 1, 0))
    loader_cpus = placement.placement.loader_cpus
    worker_init = None
    if placement.pinning:
        worker_init = functools.partial(topology.pin_loader_worker, list(loader_cpus))
    step = bound_train_step(qat_model(job.model_name, job.seed, job.data_cfg.image_size).prepared)
    batches = data.train_batches(
        job.data_cfg,
        Classification(job.data_cfg),
        batch_size=job.batch_size,
        steps=job.warmup + job.steps,
        rank=0,
        world_size=1,
        seed=job.seed,
        epoch=0,
        worker_init_fn=worker_init,
    )
    waits, computes = [], []
    it = iter(batches)
    for i in range(job.warmup + job.steps):
        start = time.perf_counter()
        batch = next(it)
        got = time.perf_counter()
        step(batch.images, batch.target)
        done = time.perf_counter()
        if i >= job.warmup:
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
        job = DataWaitJob(model_name, data_cfg, cfg.runtime, batch_size, warmup, steps, seed)
        # A fresh process: placement pins it, which must not narrow the caller's CPUs.
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_data_wait_worker, args=(job, queue))
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
