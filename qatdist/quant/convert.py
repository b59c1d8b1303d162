"""From a prepared QAT model to an int8 model: convert, eval mode, Inductor with freezing; and
loading a saved int8 program so that compiling it uses the int8 kernels (`load_int8`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Importing this module is what registers Inductor's x86 int8 lowering (its last lines install
# the weight-prepack freezing patterns and the quant lift-up pass); importing
# `torchao.quantization.pt2e.inductor_passes.x86` alone does not (torchao 0.18). Without it a
# compiled converted model runs fp32 convolutions plus quantize/dequantize arithmetic, silently.
import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from qatdist.quant import target as quant_target
from qatdist.quant.fixes.batchnorm import fold_with_model_bn_eps
from qatdist.quant.fixes.ceil_pool import rewrite_ceil_mode_int8_max_pools
from qatdist.quant.fixes.conv_bn_patterns import only_present_conv_types
from qatdist.quant.kernels.native_ops import NoCompilerError, find_compiler
from qatdist.quant.kernels.weight_scaling import restore_weight_scaling
from qatdist.quant.schedule import to_eval


def convert_to_int8(
    prepared: torch.nn.Module, *, fold_quantize: bool = True
) -> torch.fx.GraphModule:
    """A converted (quantize/dequantize pattern) copy of `prepared` in eval mode.

    Works on a deep copy: the prepared model keeps training unchanged. `fold_quantize=False`
    keeps each weight fp32 followed by its quantize/dequantize pair instead of an int8
    constant (what OpenVINO's frontend can read, `qatdist.finish.openvino_ir`).
    """
    prepared_copy = copy.deepcopy(prepared)
    restore_weight_scaling(prepared_copy)  # the conv-BN fold matches the original `mul`
    with only_present_conv_types(), fold_with_model_bn_eps(prepared):
        converted = convert_pt2e(prepared_copy, fold_quantize=fold_quantize)
    to_eval(converted)  # keeps BN eps/momentum and dropout p, which torchao's switch resets
    rewrite_ceil_mode_int8_max_pools(converted)  # Inductor's int8 pool drops ceil_mode
    return converted


def inductor_can_compile() -> str | None:
    """None when Inductor can build CPU kernels here, else why not: its C++ code needs a C++
    compiler, found as qatdist's own ops find theirs (`$CXX`, else c++, g++, clang++ on PATH)."""
    try:
        find_compiler()
    except NoCompilerError:
        return "no C++ compiler (CXX is unset and none of c++, g++, clang++ is on PATH)"
    return None


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


def load_int8(path: str | Path) -> torch.export.ExportedProgram:
    """Load an int8 program saved by qatdist (`final/model_int8.pt2`) with `torch.export.load`,
    in a process where compiling it gives int8 kernels.

    Importing this module registered torchao's quantized ops (needed to deserialize the
    program) and Inductor's x86 int8 lowering (needed for `torch.compile` with freezing, or
    `torch._inductor.aoti_compile_and_package`, to emit oneDNN qconv/qlinear calls). A plain
    `import torch, torchao` loads and runs the program eagerly but compiles it to fp32
    convolutions. Raises FileNotFoundError when `path` does not exist.

    A program built for a stronger CPU than this one (its `quant.target`, saved in its metadata)
    warns once (`Int8TargetWarning`), naming both: its int16 sums may saturate here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such int8 program (model_int8.pt2)")
    extra_files = {quant_target.METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra_files)
    target = quant_target.saved_target(extra_files) or quant_target.target_of(program.graph)
    if target is not None:
        quant_target.warn_if_weaker_cpu(target)
    return program
