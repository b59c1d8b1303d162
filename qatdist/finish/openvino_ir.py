"""The OpenVINO IR export of a QAT model (`model_int8_openvino.xml` / `.bin`), an optional format.

OpenVINO's PyTorch frontend reads a converted PT2E graph only when its weights are not folded to
int8 constants: with `convert_pt2e(prepared)` it fails on `aten.convolution` / `aten.linear`
("Arguments do not have the same element type (i8, f32)"); with `fold_quantize=False` each
quantize/dequantize pair becomes a FakeQuantize that the CPU plugin fuses into int8 kernels,
with the scales and zero points QAT learned. So the IR is built from the same prepared model as
`model_int8.pt2`, converted without folding.

OpenVINO is an optional dependency (`pip install -e '.[peers]'`); nothing here imports it until
called. Compiled models run with `INFERENCE_PRECISION_HINT=f32`: on a CPU with AVX512-BF16 the
plugin would otherwise run the layers between int8 ones in bf16, which is neither what the
converted PT2E model computes nor what its outputs are checked against.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.export import Dim

from qatdist.quant.convert import convert_to_int8

INSTALL_HINT = "pip install -e '.[peers]'"
XML, BIN = "model_int8_openvino.xml", "model_int8_openvino.bin"


def missing() -> str | None:
    """Why the OpenVINO format cannot be written here (None: it can)."""
    if importlib.util.find_spec("openvino") is None:
        return f"the openvino format needs the openvino package ({INSTALL_HINT})"
    return None


def export_ir(prepared: torch.nn.Module, example: torch.Tensor, xml_path: Path) -> None:
    """Convert `prepared` (eval mode, observers off) without folding the weights, export it
    with a dynamic batch dimension, convert it with OpenVINO and save the IR at `xml_path`
    (and its .bin beside it). Weights stay fp32 in the file (`compress_to_fp16=False`): fp16
    would move them off the int8 grid the FakeQuantize nodes snap them to."""
    import openvino as ov

    unfolded = convert_to_int8(prepared, fold_quantize=False)
    batch = Dim("batch", min=1, max=65536)
    exported = torch.export.export(unfolded, (example,), dynamic_shapes=({0: batch},))
    model = ov.convert_model(exported)
    # The frontend leaves H and W dynamic too; the model was trained at one image size.
    model.reshape([-1, *example.shape[1:]])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def compile_model(model, threads: int):
    """An OpenVINO model (or IR path) compiled for the CPU with `threads` inference threads,
    the latency hint and fp32 between the int8 layers (see the module docstring)."""
    import openvino as ov

    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    source = str(model) if isinstance(model, Path) else model
    return ov.Core().compile_model(source, "CPU", config)


def forward(compiled):
    """A torch-in, torch-out callable running `compiled` (one reused infer request)."""
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0])  # infer copies it out


def int8_kernels(compiled) -> tuple[int, int]:
    """(convolution / fully-connected layers the CPU plugin runs in int8, all of them) in a
    compiled model's runtime (execution) graph."""
    int8 = total = 0
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "FullyConnected"):
            total += 1
            int8 += info["runtimePrecision"].astype(str) in ("i8", "u8")
    return int8, total
