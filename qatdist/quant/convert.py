"""From a prepared QAT model to an int8 model: convert, eval mode, Inductor with freezing."""

from __future__ import annotations

import copy

import torch
import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  registers int8 lowerings
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from qatdist.quant.batchnorm import fold_with_model_bn_eps
from qatdist.quant.ceil_pool import rewrite_ceil_mode_int8_max_pools
from qatdist.quant.conv_bn_patterns import only_present_conv_types
from qatdist.quant.schedule import to_eval


def convert_to_int8(prepared: torch.nn.Module) -> torch.fx.GraphModule:
    """A converted (quantize/dequantize pattern) copy of `prepared` in eval mode.

    Works on a deep copy: the prepared model keeps training unchanged.
    """
    with only_present_conv_types(), fold_with_model_bn_eps(prepared):
        converted = convert_pt2e(copy.deepcopy(prepared))
    to_eval(converted)  # keeps BN eps/momentum and dropout p, which torchao's switch resets
    rewrite_ceil_mode_int8_max_pools(converted)  # Inductor's int8 pool drops ceil_mode
    return converted


def compile_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` with Inductor freezing: without freezing the int8 kernels are not used.

    Shapes are static: callers feed one batch size (padding the last batch) so the model is
    compiled once. Call the result under `torch.no_grad()`.

    Compiling an int8 linear prints Inductor's own "To copy construct from a tensor ..."
    UserWarning (torch/_inductor/mkldnn_lowerings.py, torch 2.14): its qlinear lowering turns
    the int64 weight zero point of `convert_pt2e` into int32 with `torch.tensor(tensor)`, a
    copy of a compile-time constant. Harmless: the values are the zero points (all 0, weights
    are symmetric), and the copy does not take part in autograd.
    """
    torch._inductor.config.freezing = True
    return torch.compile(model, backend="inductor", dynamic=False)
