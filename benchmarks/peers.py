"""qatdist's int8 against the x86 runtimes a user could deploy instead, side by side.

For one torchvision architecture (random init, fixed seed), the same calibration batches and the
same thread count everywhere, five stacks:

- `qatdist_int8`: qatdist's PTQ (`qatdist.quant.ptq.post_training_int8`: X86InductorQuantizer,
  the lowering qatdist's final model uses) compiled with `compile_for_inference` (Inductor
  freezing), one static compile per batch size as the final model is compiled.
- `openvino_int8`: NNCF PTQ (`nncf.quantize`, default preset) of the OpenVINO model.
- `ort_int8`: ONNX Runtime static QDQ int8, per-channel weights (`quantize_static`, default
  S8S8), from the dynamo exporter's fp32 ONNX after `quant_pre_process` (which folds BatchNorm
  into the convolutions first, as ORT's docs recommend).
- `inductor_fp32`, `openvino_fp32`: the fp32 model through Inductor (freezing) and OpenVINO.

OpenVINO runs as `qatdist.openvino_ir.compile_model` sets it up (also for qatdist's OpenVINO
export): `INFERENCE_PRECISION_HINT=f32`, since on a CPU with AVX512-BF16 its default "fp32"
computes in bf16 (and its int8 model the layers between int8 ones), which is neither the fp32
claim nor the numerics of Inductor's int8 graph, whose float parts are fp32.

The model's BatchNorm statistics are first re-estimated on the calibration batches (train-mode
forwards, cumulative average): random-init statistics (mean 0, variance 1) let activations grow
layer after layer, which a trained network's do not, and int8 ranges chosen on such activations
say nothing about a real model.

Agreement with eager fp32 is judged on a held-out batch from the calibration inputs'
distribution by the relative logit error ||y - y_fp32|| / ||y_fp32||: a random-init model's
top-1 answers are close to ties, so top-1 agreement is near chance even for a correct int8
model (it is reported, not judged), while a broken stack (wrong layout, lost weights, garbage)
has a relative error near or above 1 (about 1.4 for unrelated logits of the same scale).
Bounds: `FP32_REL_ERROR_BOUND` for the fp32 stacks, `INT8_REL_ERROR_BOUND` for the int8 ones,
loose because int8 rounding through a deep random network is large (measured 0.2-0.3 for
mobilenet_v3_large on all three int8 stacks, 0.04-0.05 for resnet18). A stack outside its bound,
or an "int8" stack that runs no convolution or linear as an int8 kernel (counted in Inductor's
generated code, OpenVINO's runtime graph, the graph ONNX Runtime optimised), is not timed.

Timing: interleaved rounds (each round runs every stack `per_round` times in a row), the first
call of each stack in a round discarded, medians of the rest. The stacks share two cores and
each leaves its threads spinning for a while after a call (OpenMP, TBB, ORT's pool): the
discarded call absorbs what the previous stack's spinning threads cost.

The peers are optional (`pip install -e '.[peers]'`): a stack whose package is missing, or whose
build fails, is listed in `skipped` with the reason, and the others still run.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch._inductor.utils import run_and_get_code

from qatdist import openvino_ir
from qatdist.config import QuantConfig
from qatdist.quant import compile_for_inference
from qatdist.quant.inspect import count_quantized_ops
from qatdist.quant.ptq import post_training_int8

QATDIST = "qatdist_int8"
PEER_INT8 = ("openvino_int8", "ort_int8")
FP32 = ("inductor_fp32", "openvino_fp32")
STACKS = (QATDIST, *PEER_INT8, *FP32)
# A lever measured on request (`stacks=STACKS + LEVERS`), not part of int8_vs_best_peer: the same
# int8 model compiled with Inductor's C++ wrapper (`cpp_wrapper`), which replaces the Python code
# that calls each kernel, the per-call overhead that weighs most at batch 1.
CPP_WRAPPER = "qatdist_int8_cpp_wrapper"
LEVERS = (CPP_WRAPPER,)
# The Python packages each stack needs (the `peers` extra of pyproject.toml).
REQUIRES = {
    QATDIST: (),
    CPP_WRAPPER: (),
    "inductor_fp32": (),
    "openvino_int8": ("openvino", "nncf"),
    "openvino_fp32": ("openvino",),
    "ort_int8": ("onnxruntime", "onnx", "onnxscript"),
}
ORT_INT8_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")
ORT_FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
FP32_REL_ERROR_BOUND = 1e-3
INT8_REL_ERROR_BOUND = 0.5
INSTALL_HINT = openvino_ir.INSTALL_HINT


def missing_packages(stacks: tuple[str, ...] = STACKS) -> dict[str, str]:
    """{stack: reason} for the stacks whose packages are not importable here."""
    out = {}
    for stack in stacks:
        absent = [p for p in REQUIRES[stack] if importlib.util.find_spec(p) is None]
        if absent:
            out[stack] = f"package(s) {', '.join(absent)} not installed ({INSTALL_HINT})"
    return out


def int8_vs_best_peer(latency_ms: dict[str, float]) -> float | None:
    """qatdist's int8 latency over the fastest peer int8 latency among those measured; None
    when qatdist's or every peer's int8 is missing. Below 1: qatdist is faster."""
    peers = [latency_ms[s] for s in PEER_INT8 if s in latency_ms]
    if QATDIST not in latency_ms or not peers:
        return None
    return latency_ms[QATDIST] / min(peers)


def geomean_int8_vs_best_peer(rows: list[dict]) -> dict[int, float]:
    """{batch size: geometric mean of `int8_vs_best_peer`} over the rows that have one."""
    by_batch: dict[int, list[float]] = {}
    for row in rows:
        if row.get("int8_vs_best_peer") is not None:
            by_batch.setdefault(row["batch_size"], []).append(row["int8_vs_best_peer"])
    return {b: statistics.geometric_mean(v) for b, v in sorted(by_batch.items())}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| over the whole batch of logits."""
    output, reference = output.double(), reference.double()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-30))


def agreement(output: torch.Tensor, reference: torch.Tensor, stack: str) -> dict:
    """Relative logit error (judged against the stack's bound) and top-1 agreement (reported)."""
    error = relative_error(output, reference)
    int8 = stack in (QATDIST, CPP_WRAPPER, *PEER_INT8)
    bound = INT8_REL_ERROR_BOUND if int8 else FP32_REL_ERROR_BOUND
    return {
        "rel_error": error,
        "bound": bound,
        "ok": error <= bound,
        "top1_agreement": float((output.argmax(1) == reference.argmax(1)).float().mean()),
    }


def _not_timed(stack: str, measured: dict) -> str | None:
    """Why a stack must not be timed (its output is off, or its "int8" has no int8 kernel)."""
    if not measured["ok"]:
        return (
            f"not timed: relative logit error {measured['rel_error']:.3g} vs eager fp32 above "
            f"its bound {measured['bound']}"
        )
    if stack in (QATDIST, *PEER_INT8) and measured.get("int8_kernels", [1])[0] == 0:
        return "not timed: no convolution or linear runs as an int8 kernel"
    return None


def seeded_model(name: str, seed: int, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """torchvision `name` (1000 classes, random init from `seed`) in eval mode, its BatchNorm
    statistics re-estimated on `calibration` (see the module docstring)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for images in calibration:
            model(images)
    return model.eval()


def interleaved_rounds_ms(
    forwards: dict[str, Callable], example: torch.Tensor, rounds: int, per_round: int
) -> dict[str, float]:
    """Median ms per call of each forward on `example` over `rounds` interleaved rounds of
    `per_round` consecutive calls, the first call of each run of calls not counted."""
    if per_round < 2:
        raise ValueError("per_round must be >= 2: the first call of each round is discarded")
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.no_grad():
        for _ in range(rounds):
            for name, forward in forwards.items():
                for i in range(per_round):
                    start = time.perf_counter()
                    forward(example)
                    if i:
                        times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def _numpy_forward(run: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.from_numpy(run(x.numpy()))


def _openvino_forwards(
    fp32: torch.nn.Module,
    calibration: list[torch.Tensor],
    threads: int,
    want: set[str],
    kernels: dict[str, tuple[int, int]],
) -> dict[str, Callable]:
    """The OpenVINO stacks in `want`; `kernels` receives each one's int8 kernel count."""
    import openvino as ov

    example = calibration[0]
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(fp32, (example,), dynamic_shapes=({0: batch},))
    ov_model = ov.convert_model(exported)
    # The frontend leaves H and W dynamic too; fixing them lets the plugin pick its kernels
    # for the benchmark's shape up front (the batch stays dynamic: one model for 1 and 32).
    ov_model.reshape([-1, *example.shape[1:]])
    models = {}
    if "openvino_fp32" in want:
        models["openvino_fp32"] = ov_model
    if "openvino_int8" in want:
        import nncf

        dataset = nncf.Dataset([x.numpy() for x in calibration])
        models["openvino_int8"] = nncf.quantize(ov_model, dataset, subset_size=len(calibration))
    forwards = {}
    for name, model in models.items():
        compiled = openvino_ir.compile_model(model, threads)
        kernels[name] = openvino_ir.int8_kernels(compiled)
        forwards[name] = openvino_ir.forward(compiled)
    return forwards


def _ort_forward(
    fp32: torch.nn.Module,
    calibration: list[torch.Tensor],
    threads: int,
    folder: Path,
    kernels: dict[str, tuple[int, int]],
) -> Callable:
    """The ORT int8 stack, built in `folder`; `kernels` receives its `ort_int8_kernels`."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, pre_path, int8_path = (folder / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        fp32,
        (calibration[0],),
        str(fp32_path),
        dynamo=True,
        opset_version=18,
        dynamic_shapes=({0: batch},),
        external_data=False,
    )
    quant_pre_process(str(fp32_path), str(pre_path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    input_name = ort.InferenceSession(str(pre_path), options).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(pre_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True
    )
    options.optimized_model_filepath = str(folder / "optimized.onnx")  # what ORT will run
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    kernels["ort_int8"] = ort_int8_kernels(folder / "optimized.onnx")
    return _numpy_forward(lambda a: session.run(None, {input_name: a})[0])


def ort_int8_kernels(optimized: Path) -> tuple[int, int]:
    """(int8 convolution/matmul nodes, all of them) in the graph ONNX Runtime runs after its
    optimizations, which fuse each DequantizeLinear-Conv-QuantizeLinear into a QLinearConv
    (a float Conv left there means that layer runs fp32)."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    int8 = sum(op in ORT_INT8_OPS for op in ops)
    return int8, int8 + sum(op in ORT_FLOAT_OPS for op in ops)


def _inductor_forwards(
    fp32: torch.nn.Module, calibration: list[torch.Tensor], want: set[str]
) -> dict[str, torch.nn.Module]:
    """Compiled (not yet warmed) Inductor forwards; each compiles at its first call per shape."""
    forwards = {}
    if QATDIST in want:
        int8 = post_training_int8(
            copy.deepcopy(fp32),
            fp32.state_dict(),
            calibration,
            QuantConfig(),
            image_size=calibration[0].shape[-1],
        )
        forwards[QATDIST] = compile_for_inference(int8)
    if CPP_WRAPPER in want:
        if QATDIST not in want:
            raise ValueError(f"{CPP_WRAPPER} is measured beside {QATDIST}: ask for both")
        forwards[CPP_WRAPPER] = torch.compile(
            copy.deepcopy(int8), backend="inductor", dynamic=False, options={"cpp_wrapper": True}
        )  # freezing: already on, set by compile_for_inference
    if "inductor_fp32" in want:
        forwards["inductor_fp32"] = compile_for_inference(copy.deepcopy(fp32))
    return forwards


def _build(stack_group: str, build: Callable[[], dict], skipped: dict, names: set[str]) -> dict:
    """`build()`, or {} with every stack of the group listed in `skipped` and the error."""
    try:
        return build()
    except Exception as e:  # a peer's failure is reported and the others still run
        for name in names:
            skipped[name] = f"{stack_group} failed: {type(e).__name__}: {e}"[:500]
        return {}


def peer_latency(
    model_name: str,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    image_size: int = 224,
    threads: int = 2,
    calib_batches: int = 4,
    calib_batch_size: int = 8,
    rounds: int = 10,
    per_round: int = 3,
    seed: int = 0,
    stacks: tuple[str, ...] = STACKS,
) -> dict:
    """Latency (interleaved medians, ms) of each runnable stack at each batch size, agreement
    with eager fp32, `int8_vs_best_peer` per batch size, and {stack: reason} for what did not
    run. See the module docstring for the stacks and the agreement criterion."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # earlier models' compiled graphs would count against the cache limit
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (3, image_size, image_size)
    calibration = [
        torch.randn(calib_batch_size, *shape, generator=generator) for _ in range(calib_batches)
    ]
    # At the largest batch size measured, so that the compile it triggers is reused there.
    held_out = torch.randn(max(batch_sizes), *shape, generator=generator)
    fp32 = seeded_model(model_name, seed, calibration)
    skipped = missing_packages(stacks)
    want = {s for s in stacks if s not in skipped}
    forwards: dict[str, Callable] = {}
    build_s: dict[str, float] = {}
    kernels: dict[str, tuple[int, int]] = {}  # stack: (int8 conv/linear kernels, all of them)
    start = time.perf_counter()
    inductor = {QATDIST, "inductor_fp32"} & want
    forwards |= _build(
        "inductor", lambda: _inductor_forwards(fp32, calibration, want), skipped, inductor
    )
    build_s["inductor_convert"] = time.perf_counter() - start
    openvino = {"openvino_int8", "openvino_fp32"} & want
    if openvino:
        start = time.perf_counter()
        forwards |= _build(
            "openvino",
            lambda: _openvino_forwards(fp32, calibration, threads, openvino, kernels),
            skipped,
            openvino,
        )
        build_s["openvino"] = time.perf_counter() - start
    if "ort_int8" in want:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="qatdist-ort-") as folder:
            forwards |= _build(
                "onnxruntime",
                lambda: {
                    "ort_int8": _ort_forward(fp32, calibration, threads, Path(folder), kernels)
                },
                skipped,
                {"ort_int8"},
            )
        build_s["onnxruntime"] = time.perf_counter() - start

    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in fp32.modules())
    with torch.no_grad():
        reference = fp32(held_out)
        agreements = {}
        for name in list(forwards):  # qatdist's first: run_and_get_code resets Dynamo's caches
            start = time.perf_counter()
            try:  # the first call is where Inductor compiles; a failure there skips the stack
                if name == QATDIST:
                    output, codes = run_and_get_code(forwards[name], held_out)
                    counts = count_quantized_ops("\n".join(codes))
                    kernels[name] = (counts["conv"] + counts["linear"], layers)
                else:
                    output = forwards[name](held_out)
            except Exception as e:
                skipped[name] = f"first call failed: {type(e).__name__}: {e}"[:500]
                del forwards[name]
                continue
            build_s[f"{name}_first_call"] = time.perf_counter() - start
            agreements[name] = agreement(output, reference, name)
            if name in kernels:
                agreements[name]["int8_kernels"] = list(kernels[name])
            if reason := _not_timed(name, agreements[name]):
                skipped[name] = reason
                del forwards[name]

    rows = []
    for b in batch_sizes:
        example = torch.randn(b, *shape, generator=generator)
        with torch.no_grad():
            for name in list(forwards):  # Inductor compiles each static shape here
                try:
                    forwards[name](example)
                except Exception as e:
                    skipped[name] = f"failed at batch {b}: {type(e).__name__}: {e}"[:500]
                    del forwards[name]
        ms = interleaved_rounds_ms(forwards, example, rounds, per_round) if forwards else {}
        rows.append({"batch_size": b, "ms": ms, "int8_vs_best_peer": int8_vs_best_peer(ms)})
    return {
        "model": model_name,
        "image_size": image_size,
        "threads": threads,
        "rounds": [rounds, per_round],
        "calibration": [calib_batches, calib_batch_size],
        "rows": rows,
        "agreement": agreements,
        "skipped": skipped,
        "build_s": build_s,
    }


def versions() -> dict[str, str | None]:
    """Installed versions of the peer packages (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("openvino", "nncf", "onnxruntime", "onnx", "onnxscript"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
