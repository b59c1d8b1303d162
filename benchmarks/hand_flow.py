"""qatdist's final int8 model against the plain PT2E recipe written by hand, on the same weights:
the cost (or gain) of qatdist's own capture, prepare, convert and compile choices."""

from __future__ import annotations

import copy

import torch

from benchmarks.common import (
    calibrate,
    calibration_batches,
    compile_and_warm,
    qat_model,
    synthetic_batch,
)
from qatdist.quant import compile_for_inference
from qatdist.quant.capture import make_call_sites_distinct
from qatdist.tasks.classification import agreement_where_decided
from qatdist.tasks.evaluate import side_by_side_latency_ms


def _hand_flow_prepare(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The notes' plain recipe up to prepare: static export, distinct ReLU call sites (the
    plain flow fails without), the stock X86InductorQuantizer QAT config with qatdist's default
    weight range for this CPU (`qatdist.quant.target`: both flows then build the same model),
    prepare_qat_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    graph_module = torch.export.export(model, (example,)).module()
    make_call_sites_distinct(graph_module)
    quantizer = X86InductorQuantizer()
    from qatdist.quant import target as quant_target

    config = get_default_x86_inductor_quantization_config(is_qat=True)
    quantizer.set_global(quant_target.for_target(config, "auto"))
    return prepare_qat_pt2e(graph_module, quantizer)


def _hand_flow_finish(prepared: torch.nn.Module) -> torch.nn.Module:
    import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  (registers the int8 passes)
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
    ours = qat_model(model_name, seed, image_size)
    calibrate(ours.prepared, calibration_batches(calib_batches, batch_size, image_size, seed))
    # A copy: the exported graph shares the model's tensors, and loading the state below
    # would otherwise overwrite `ours.fp32_model`.
    hand = _hand_flow_prepare(copy.deepcopy(ours.fp32_model), example)
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
    (`same_weights_int8_pair`), each compiled its own way; interleaved medians.

    `top1_agreement` is judged only on the `agreement_comparable` samples whose top-2 margin
    in the hand flow's logits exceeds the two models' largest logit difference (None if none
    is): on a barely trained model the other samples' argmax depends on the CPU's rounding."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # earlier figures' compiled graphs would count against the cache limit
    example = synthetic_batch(batch_size, image_size, seed)[0]
    ours, hand = same_weights_int8_pair(model_name, example, calib_batches=calib_batches, seed=seed)
    ours_c, ours_compile_s = compile_and_warm(ours, example, compile_for_inference)
    hand_c, hand_compile_s = compile_and_warm(hand, example, _hand_flow_compile)
    with torch.no_grad():
        agreeing, comparable = agreement_where_decided(hand_c(example), ours_c(example))
    latency = side_by_side_latency_ms({"qatdist": ours_c, "hand": hand_c}, example, iters)
    return {
        "model": model_name,
        "shape": list(example.shape),
        "threads": threads,
        "iters": iters,
        "qatdist_ms": latency["qatdist"],
        "hand_ms": latency["hand"],
        "compile_s": {"qatdist": ours_compile_s, "hand": hand_compile_s},
        "top1_agreement": agreeing / comparable if comparable else None,
        "agreement_comparable": comparable,
        "ratio": latency["qatdist"] / latency["hand"],
    }
