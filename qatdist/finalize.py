"""The end of a run (rank 0): convert, compile with freezing, measure, save.

Shared by the trainer's last step and `scripts/export_final.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.export import Dim

from qatdist.evaluate import count_correct, side_by_side_latency_ms
from qatdist.quant.convert import compile_for_inference, convert_to_int8

log = logging.getLogger(__name__)


def export_int8(int8_model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save the converted model with a dynamic batch dimension (`torch.export.save`); it loads
    with `torch.export.load` in any process that imports torchao (which registers the
    quantized ops)."""
    batch = Dim("batch", min=1, max=65536)
    exported = torch.export.export(int8_model, (example,), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(exported, str(path))


def finalize(
    prepared: torch.nn.Module,
    fp32_model: torch.nn.Module,
    val_batches: Callable[[int], Iterable],
    *,
    image_size: int,
    latency_batch_size: int,
    latency_iters: int,
    out_dir: Path,
    compile_model: bool = True,
) -> dict:
    """Convert `prepared`, evaluate and benchmark the compiled int8 model against the compiled
    fp32 `fp32_model` (same architecture, same batch and threads), save `model_int8.pt2` and a
    reference input/output pair into `out_dir`. Returns report fields.

    `val_batches(batch_size)` yields this process's validation batches.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    int8_model = convert_to_int8(prepared)
    example = torch.randn(
        latency_batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )

    with torch.no_grad():
        reference_logits = int8_model(example)
    export_int8(int8_model, example, out_dir / "model_int8.pt2")
    torch.save({"input": example, "logits": reference_logits}, out_dir / "reference_io.pt")

    fp32_model = fp32_model.eval()
    if compile_model:
        log.info("compiling int8 and fp32 models with Inductor (freezing)")
        start = time.perf_counter()
        int8_forward = compile_for_inference(int8_model)
        fp32_forward = compile_for_inference(fp32_model)
        with torch.no_grad():  # first calls compile
            int8_forward(example)
            fp32_forward(example)
        compile_s = time.perf_counter() - start
    else:
        int8_forward, fp32_forward, compile_s = int8_model, fp32_model, 0.0

    correct, seen = count_correct(
        int8_forward, val_batches(latency_batch_size), pad_to=latency_batch_size
    )
    latency = side_by_side_latency_ms(
        {"int8": int8_forward, "fp32": fp32_forward}, example, latency_iters
    )
    return {
        "int8_top1": correct / seen if seen else 0.0,
        "int8_eval_samples": seen,
        "int8_latency_ms": latency["int8"],
        "fp32_latency_ms": latency["fp32"],
        "int8_speedup": latency["fp32"] / latency["int8"],
        "latency_batch_size": latency_batch_size,
        "compiled": compile_model,
        "compile_seconds": compile_s,
        "threads": torch.get_num_threads(),
    }
