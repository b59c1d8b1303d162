"""Single-process figures: the QAT train step's cost and the int8 model's compiled speedup."""

from __future__ import annotations

import os
import statistics
import time

import torch

from benchmarks.common import (
    bound_train_step,
    calibrate,
    calibration_batches,
    compile_and_warm,
    qat_model,
    synthetic_batch,
)
from qatdist.quant import compile_for_inference
from qatdist.tasks.evaluate import side_by_side_latency_ms


def _self_cpu_ms_per_op(step, images, labels, steps: int) -> dict[str, float]:
    """Self CPU time per step (ms) of every op `torch.profiler` sees in `steps` calls of
    `step`."""
    # Kineto, the profiler's backend, logs "profiler_start" / "profiler_stop" and, in the CUDA
    # build of torch on a machine without a GPU, "gpuGetDeviceCount failed with code 35" at
    # every profile, though only CPU activities are asked for: level 6 is above all of its
    # levels. Read when a profile starts; a level the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(images, labels)
    return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}


def step_overhead_profile(qat_step, fp32_step, images, labels, steps: int = 2, top: int = 8):
    """What a QAT step spends beyond the fp32 step, by op: the `top` ops whose self CPU time
    per step grew most, as (op, QAT ms, fp32 ms), and the total of every op's growth. Times are
    the profiler's (it adds its own overhead), for telling where the gap is, not its size."""
    qat = _self_cpu_ms_per_op(qat_step, images, labels, steps)
    fp32 = _self_cpu_ms_per_op(fp32_step, images, labels, steps)
    growth = {op: qat.get(op, 0.0) - fp32.get(op, 0.0) for op in qat.keys() | fp32.keys()}
    ranked = sorted(growth, key=growth.get, reverse=True)[:top]
    return {
        "ops": [(op, qat.get(op, 0.0), fp32.get(op, 0.0)) for op in ranked],
        "qat_total_ms": sum(qat.values()),
        "fp32_total_ms": sum(fp32.values()),
    }


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
    steps interleaved after warm-up, medians). Returns timings (ms), the ratio, the same ratio
    with a lever switched off, and the profile of what the QAT step adds
    (`step_overhead_profile`)."""
    torch.set_num_threads(threads)
    qat = qat_model(model_name, seed, image_size)
    torchao_op = qat_model(model_name, seed, image_size, fast_fake_quant=False).prepared
    unfused = qat_model(model_name, seed, image_size, fused_weight_scaling=False).prepared
    steps = {
        "fp32": bound_train_step(qat.fp32_model.train()),
        "qat": bound_train_step(qat.prepared),
        "qat_torchao_op": bound_train_step(torchao_op),
        "qat_unfused_weight_scaling": bound_train_step(unfused),
    }
    images, labels = synthetic_batch(batch_size, image_size, seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images, labels)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    fp32_ms, qat_ms = statistics.median(times["fp32"]), statistics.median(times["qat"])
    profile = step_overhead_profile(steps["qat"], steps["fp32"], images, labels)
    torchao_op_ms = statistics.median(times["qat_torchao_op"])
    unfused_ms = statistics.median(times["qat_unfused_weight_scaling"])
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
        "qat_unfused_weight_scaling_ms": unfused_ms,
        "ratio_unfused_weight_scaling": unfused_ms / fp32_ms,
        "overhead_profile": profile,
    }


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
    """fp32 compiled latency / int8 compiled latency: int8 through qatdist's flow (`QatModel`,
    calibration forwards, `to_int8`, `compile_for_inference`), fp32 the same seeded eager model
    in eval mode through `compile_for_inference`; interleaved medians."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # earlier figures' compiled graphs would count against the cache limit
    qat = qat_model(model_name, seed, image_size)
    calibrate(qat.prepared, calibration_batches(calib_batches, batch_size, image_size, seed))
    int8 = qat.to_int8()
    fp32 = qat.fp32_model.eval()
    example = synthetic_batch(batch_size, image_size, seed)[0]
    int8_c, int8_compile_s = compile_and_warm(int8, example, compile_for_inference)
    fp32_c, fp32_compile_s = compile_and_warm(fp32, example, compile_for_inference)
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
