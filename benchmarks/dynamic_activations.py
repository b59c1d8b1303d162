"""Static vs dynamic activation quantization of a QAT model's linears: is a `dynamic` option
worth having? (The answer and the measurements are in docs/coverage.md.)

Both models are prepared from the same fp32 model with X86InductorQuantizer's QAT config, one
static (qatdist's), one with `is_dynamic=True` (activation scale and zero point computed per
batch at run time), see the same calibration batches, and are converted, compiled with freezing
and timed side by side. Dynamic QAT converts only on the prepared model itself, before the eval
switch: `convert_pt2e` of a `copy.deepcopy` fails with "No chose qparams node found for linear"
(the copied graph's quantization annotations still point at the original's nodes), and so does
converting after torchao's eval switch.

    python -m benchmarks.dynamic_activations vit_b_16 --image-size 224 --batch-size 2
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch._inductor.utils import run_and_get_code
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from qatdist.config import ModelConfig
from qatdist.models import build_model
from qatdist.quant import capture, compile_for_inference
from qatdist.quant import target as quant_target
from qatdist.quant.fixes.attention import attribute_functional_linears
from qatdist.quant.inspect import count_quantized_ops
from qatdist.quant.schedule import to_eval
from qatdist.tasks.evaluate import side_by_side_latency_ms

NUM_CLASSES = 10


def int8_variant(
    fp32: torch.nn.Module, image_size: int, dynamic: bool, calibration, target: str = "auto"
) -> tuple:
    """`fp32` QAT-prepared with static or dynamic activations (weights in `target`'s range,
    `qatdist.quant.target`), run on the `calibration` batches, converted and compiled:
    (converted eval-mode model, compiled model, int8 kernel counts in the compiled code)."""
    graph = capture(copy.deepcopy(fp32), torch.randn(2, 3, image_size, image_size))
    attribute_functional_linears(graph)  # attention projections quantized, as qatdist does
    # A fresh quantizer: one whose global config was static ignores (warns) a dynamic one.
    quantizer = X86InductorQuantizer()
    config = get_default_x86_inductor_quantization_config(is_qat=True, is_dynamic=dynamic)
    quantizer.set_global(quant_target.for_target(config, target))
    prepared = prepare_qat_pt2e(graph, quantizer)
    for images in calibration:
        prepared(images)
    converted = convert_pt2e(prepared)  # in train mode, not a copy (see the module docstring)
    to_eval(converted)
    compiled = compile_for_inference(converted)
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, calibration[0])
    return converted, compiled, count_quantized_ops("\n".join(codes))


def static_vs_dynamic(name: str, image_size: int, batch_size: int, iters: int) -> dict:
    """Int8 kernel counts and compiled latency (ms, interleaved) of static int8, dynamic int8
    and fp32, and the largest |compiled - converted| logit difference of each int8 model beside
    the converted model's largest |logit|."""
    torch.manual_seed(0)
    fp32 = build_model(ModelConfig(name=name), NUM_CLASSES, image_size=image_size).eval()
    with torch.no_grad():  # torchvision's ViTs start with a zero head: every logit would be 0
        for module in fp32.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                torch.nn.init.normal_(module.weight, std=0.02)
    generator = torch.Generator().manual_seed(0)
    calibration = [
        torch.randn(batch_size, 3, image_size, image_size, generator=generator) for _ in range(3)
    ]
    example = calibration[0]
    forwards, result = {}, {"model": name, "image_size": image_size, "batch_size": batch_size}
    for kind in ("static", "dynamic"):
        converted, compiled, counts = int8_variant(fp32, image_size, kind == "dynamic", calibration)
        with torch.no_grad():
            reference = converted(example)
            diff = (compiled(example) - reference).abs().max()
        result[f"{kind}_int8_kernels"] = counts
        result[f"{kind}_max_logit_diff"] = round(float(diff), 5)
        result[f"{kind}_max_abs_logit"] = round(float(reference.abs().max()), 5)
        forwards[kind] = compiled
    forwards["fp32"] = compile_for_inference(fp32)
    with torch.no_grad():
        forwards["fp32"](example)
    ms = side_by_side_latency_ms(forwards, example, iters)
    result |= {f"{k}_ms": round(v, 3) for k, v in ms.items()}
    result["dynamic_vs_static"] = round(ms["static"] / ms["dynamic"], 3)  # > 1: dynamic faster
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a qatdist/torchvision model name (e.g. vit_b_16)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(static_vs_dynamic(args.model, args.image_size, args.batch_size, args.iters))


if __name__ == "__main__":
    main()
