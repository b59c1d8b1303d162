"""qatdist's int8 against the x86 runtimes a user could deploy instead, side by side.

For one torchvision architecture (random init, fixed seed), the same calibration batches and the
same thread count everywhere, these stacks (a segmenter, e.g. lraspp_mobilenet_v3_large, runs
as qatdist trains it: `SEGMENTER_CLASSES` classes, its per-pixel logits `out`, captured with
dynamic height and width, timed at a full frame such as CamVid's 360x480):

- qatdist's artifacts, all from one PTQ (`qatdist.quant.ptq`: X86InductorQuantizer, the lowering
  and the scales layout qatdist's final model uses):
  - `qatdist_int8`: the converted model compiled with `compile_for_inference` (Inductor
    freezing), one static compile per batch size, as `final/` compiles it;
  - `qatdist_int8_aoti`: the AOTInductor package `scripts/export_final.py` writes
    (`model_int8_aoti.pt2`, dynamic batch);
  - `qatdist_int8_openvino`: the OpenVINO IR `export_final --formats ...,openvino` writes
    (`qatdist.finish.openvino_ir.export_ir`: the same quantizer's scales as FakeQuantize
    nodes), run by OpenVINO.
- `openvino_int8`: NNCF PTQ (`nncf.quantize`, default preset) of the OpenVINO model.
- `ort_int8`: ONNX Runtime static QDQ int8, per-channel weights (`quantize_static`, default
  S8S8), from the dynamo exporter's fp32 ONNX after `quant_pre_process` (which folds BatchNorm
  into the convolutions first, as ORT's docs recommend).
- `inductor_fp32`, `openvino_fp32`: the fp32 model through Inductor (freezing) and OpenVINO.

OpenVINO runs as `qatdist.finish.openvino_ir.compile_model` sets it up (also for qatdist's OpenVINO
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

Each stack lives in a process of its own (`_StackProcess`), built one after the other: in one
process the runtimes' thread pools (OpenMP, OpenVINO's TBB, ORT's pool) contend for the cores
and inflated a few-millisecond call 2-3x (docs/performance.md). Timing stays side by side:
interleaved rounds, in each of which the parent asks every stack's process in turn for
`per_round` consecutive calls (the others wait on their pipe, idle), after `SETTLE_S` of idle
time; the first call of each run is discarded (a cold cache, threads waking), medians of the
rest.

The peers are optional (`pip install -e '.[peers]'`): a peer whose package is missing, or whose
build fails, is listed in `skipped` with the reason, and the others still run. A stack that does
not answer within its deadline (`BUILD_DEADLINE_S` to build, `CALL_DEADLINE_S` per request
after) is killed and listed in `hung`. qatdist's own stacks are what the comparison is about:
one that fails or hangs raises `QatdistStackError` instead.
"""

from __future__ import annotations

import copy
import importlib.util
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch._inductor.utils import run_and_get_code

from qatdist.config import DataConfig, ModelConfig, QuantConfig
from qatdist.finish import openvino_ir
from qatdist.finish.artifacts import aoti_package_source, build_aoti_package, export_int8
from qatdist.models import SEGMENTATION_MODELS, build_model
from qatdist.quant import compile_for_inference
from qatdist.quant.inspect import count_quantized_ops
from qatdist.quant.ptq import post_training_int8, prepare_ptq

QATDIST = "qatdist_int8"
AOTI = "qatdist_int8_aoti"
QATDIST_OPENVINO = "qatdist_int8_openvino"
# Every int8 artifact qatdist produces; `int8_vs_best_peer` takes the fastest of them.
QATDIST_ARTIFACTS = (QATDIST, AOTI, QATDIST_OPENVINO)
PEER_INT8 = ("openvino_int8", "ort_int8")
FP32 = ("inductor_fp32", "openvino_fp32")
STACKS = (*QATDIST_ARTIFACTS, *PEER_INT8, *FP32)
# A lever measured on request (`stacks=STACKS + LEVERS`), not part of int8_vs_best_peer: the same
# int8 model compiled with Inductor's C++ wrapper (`cpp_wrapper`), which replaces the Python code
# that calls each kernel, the per-call overhead that weighs most at batch 1.
CPP_WRAPPER = "qatdist_int8_cpp_wrapper"
LEVERS = (CPP_WRAPPER,)
INT8 = (*QATDIST_ARTIFACTS, CPP_WRAPPER, *PEER_INT8)
# The Python packages each stack needs (the `peers` extra of pyproject.toml).
REQUIRES = {
    QATDIST: (),
    AOTI: (),
    QATDIST_OPENVINO: ("openvino",),
    CPP_WRAPPER: (),
    "inductor_fp32": (),
    "openvino_int8": ("openvino", "nncf"),
    "openvino_fp32": ("openvino",),
    "ort_int8": ("onnxruntime", "onnx", "onnxscript"),
}
ORT_INT8_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")
ORT_FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
# Idle time before each stack's run of calls: the previous process's threads (OpenMP, TBB,
# ORT's pool) spin for a while after its last call before they sleep.
SETTLE_S = 0.05
FP32_REL_ERROR_BOUND = 1e-3
INT8_REL_ERROR_BOUND = 0.5
INSTALL_HINT = openvino_ir.INSTALL_HINT
# How long a stack's process may take to answer before it counts as hung and is killed: a
# resnet50 AOTInductor build took minutes on 2 cores; a warm-up request compiles a batch size.
BUILD_DEADLINE_S = 1800.0
CALL_DEADLINE_S = 600.0
SEGMENTER_CLASSES = 11  # CamVid's: the segmenter row is the model of configs/camvid_*.toml


class QatdistStackError(RuntimeError):
    """One of qatdist's own stacks failed or hung: the comparison has nothing to compare."""


def missing_packages(stacks: tuple[str, ...] = STACKS) -> dict[str, str]:
    """{stack: reason} for the stacks whose packages are not importable here."""
    out = {}
    for stack in stacks:
        absent = [p for p in REQUIRES[stack] if importlib.util.find_spec(p) is None]
        if absent:
            out[stack] = f"package(s) {', '.join(absent)} not installed ({INSTALL_HINT})"
    return out


def fastest_qatdist(latency_ms: dict[str, float]) -> str | None:
    """The fastest of qatdist's int8 artifacts among those measured (None: none was)."""
    measured = [s for s in QATDIST_ARTIFACTS if s in latency_ms]
    return min(measured, key=latency_ms.__getitem__) if measured else None


def int8_vs_best_peer(latency_ms: dict[str, float]) -> float | None:
    """The fastest qatdist int8 artifact's latency over the fastest peer int8 latency among
    those measured; None when no qatdist artifact or no peer int8 was measured. Below 1:
    qatdist is faster."""
    peers = [latency_ms[s] for s in PEER_INT8 if s in latency_ms]
    ours = fastest_qatdist(latency_ms)
    if ours is None or not peers:
        return None
    return latency_ms[ours] / min(peers)


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
    bound = INT8_REL_ERROR_BOUND if stack in INT8 else FP32_REL_ERROR_BOUND
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
    if stack in INT8 and measured.get("int8_kernels", [1])[0] == 0:
        return "not timed: no convolution or linear runs as an int8 kernel"
    return None


class _PixelLogits(torch.nn.Module):
    """A torchvision segmenter returning only its per-pixel logits (the dict's `out`): one
    tensor, which every stack exports and runs alike."""

    def __init__(self, segmenter: torch.nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images)["out"]


def seeded_model(
    name: str, seed: int, calibration: list[torch.Tensor], weights: str | None = None
) -> torch.nn.Module:
    """torchvision `name` (a classifier with 1000 classes, or a segmenter with
    `SEGMENTER_CLASSES` returning its logits) in eval mode: with `weights` (a trained model's
    state dict, e.g. `scripts/fp32_weights.py`'s file) loaded strictly, else random init from
    `seed` with its BatchNorm statistics re-estimated on `calibration` (module docstring)."""
    torch.manual_seed(seed)
    if name in SEGMENTATION_MODELS:
        segmenter = build_model(
            ModelConfig(name=name),
            SEGMENTER_CLASSES,
            image_size=min(calibration[0].shape[-2:]),
            dense=True,
        )
        model = _PixelLogits(segmenter)
    else:
        model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        (model.segmenter if isinstance(model, _PixelLogits) else model).load_state_dict(state)
        return model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for images in calibration:
            model(images)
    return model.eval()


def frame_of(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width): a square for an int."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _frames(folder: str, frame: tuple[int, int], count: int) -> torch.Tensor:
    """The first `count` images of `folder` (sorted), resized to `frame` and normalised as
    qatdist's transforms do (data.mean / data.std defaults); cycled when there are fewer."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not paths:
        raise ValueError(f"no .jpg or .png image in {folder}")
    data_cfg = DataConfig()
    out = []
    for i in range(count):
        with Image.open(paths[i % len(paths)]) as image:
            pixels = TF.pil_to_tensor(image.convert("RGB"))
        pixels = TF.resize(pixels, list(frame), antialias=True)
        out.append(TF.normalize(pixels.float() / 255, data_cfg.mean, data_cfg.std))
    return torch.stack(out)


def inputs(
    seed: int,
    image_size: int | tuple[int, int],
    calib_batches: int,
    calib_batch_size: int,
    batch_sizes,
    frames: str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
    """(calibration batches, held-out batch, {batch size: timing example}) of `image_size`
    frames (int: square; or (height, width)), the same in every process for the same
    arguments: Gaussian noise, or the images of the folder `frames` (calibration first, then
    the held-out ones). The held-out batch has the largest batch size measured, so that
    Inductor's static compile it triggers is reused there."""
    if frames is not None:
        held = max(batch_sizes)
        n = calib_batches * calib_batch_size
        images = _frames(frames, frame_of(image_size), n + held)
        calibration = list(images[:n].split(calib_batch_size))
        return calibration, images[n:], {b: images[n : n + b] for b in batch_sizes}
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (3, *frame_of(image_size))
    calibration = [
        torch.randn(calib_batch_size, *shape, generator=generator) for _ in range(calib_batches)
    ]
    held_out = torch.randn(max(batch_sizes), *shape, generator=generator)
    examples = {b: torch.randn(b, *shape, generator=generator) for b in batch_sizes}
    return calibration, held_out, examples


def _numpy_forward(run: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.from_numpy(run(x.numpy()))


def _openvino_model(fp32: torch.nn.Module, example: torch.Tensor):
    """`openvino.convert_model` of the exported fp32 model, batch dynamic, H and W fixed."""
    import openvino as ov

    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(fp32, (example,), dynamic_shapes=({0: batch},))
    model = ov.convert_model(exported)
    # The frontend leaves H and W dynamic too; fixing them lets the plugin pick its kernels
    # for the benchmark's shape up front (the batch stays dynamic: one model for 1 and 32).
    model.reshape([-1, *example.shape[1:]])
    return model


def _openvino_stack(model, threads: int) -> tuple[Callable, tuple[int, int]]:
    compiled = openvino_ir.compile_model(model, threads)
    return openvino_ir.forward(compiled), openvino_ir.int8_kernels(compiled)


def _ort_stack(
    fp32: torch.nn.Module, calibration: list[torch.Tensor], threads: int, folder: Path
) -> tuple[Callable, tuple[int, int]]:
    """The ORT int8 stack, built in `folder`, and its `ort_int8_kernels`."""
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
    # What ORT will run, saved to count its int8 kernels. ORT warns that a graph optimised at
    # this level (NCHWc layouts) may be specific to this machine: harmless, the file is only read
    # here, on the machine that made it, and thrown away with the stack's temporary folder.
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    run = _numpy_forward(lambda a: session.run(None, {input_name: a})[0])
    return run, ort_int8_kernels(folder / "optimized.onnx")


def ort_int8_kernels(optimized: Path) -> tuple[int, int]:
    """(int8 convolution/matmul nodes, all of them) in the graph ONNX Runtime runs after its
    optimizations, which fuse each DequantizeLinear-Conv-QuantizeLinear into a QLinearConv
    (a float Conv left there means that layer runs fp32)."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    int8 = sum(op in ORT_INT8_OPS for op in ops)
    return int8, int8 + sum(op in ORT_FLOAT_OPS for op in ops)


def _conv_linear_layers(model: torch.nn.Module) -> int:
    """Convolution and linear layers of `model`: what an int8 stack should run in int8."""
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())


def _capture_size(fp32: torch.nn.Module, calibration: list[torch.Tensor]) -> dict:
    """How qatdist captures `fp32`: a classifier at its (square) input size, a segmenter with
    dynamic height and width, as `qatdist.train` captures it."""
    dense = isinstance(fp32, _PixelLogits)
    return {"image_size": min(calibration[0].shape[-2:]), "dynamic_spatial": dense}


def _calibrated_ptq(fp32: torch.nn.Module, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """qatdist's PTQ-prepared model after the calibration batches (observers filled)."""
    prepared = prepare_ptq(
        fp32, fp32.state_dict(), QuantConfig(), **_capture_size(fp32, calibration)
    )
    with torch.no_grad():
        for images in calibration:
            prepared(images)
    return prepared


def build_stack(
    stack: str, fp32: torch.nn.Module, calibration: list[torch.Tensor], threads: int, folder: Path
) -> tuple[Callable, tuple[int, int] | None]:
    """(forward, int8 kernel count or None) of one stack, files in `folder`. Inductor's int8
    stacks compile at their first call (`build_first_call` counts their kernels there)."""
    if stack in (QATDIST, CPP_WRAPPER, AOTI):
        int8 = post_training_int8(
            copy.deepcopy(fp32),
            fp32.state_dict(),
            calibration,
            QuantConfig(),
            **_capture_size(fp32, calibration),
        )
        if stack == QATDIST:
            return compile_for_inference(int8), None
        if stack == CPP_WRAPPER:
            torch._inductor.config.freezing = True
            options = {"cpp_wrapper": True}
            return torch.compile(int8, backend="inductor", dynamic=False, options=options), None
        exported = export_int8(int8, calibration[0], folder / "model_int8.pt2")
        package = build_aoti_package(exported, folder / "model_int8_aoti.pt2")
        counts = count_quantized_ops(aoti_package_source(package))
        kernels = (counts["conv"] + counts["linear"], _conv_linear_layers(fp32))
        return torch._inductor.aoti_load_package(str(package)), kernels
    if stack == QATDIST_OPENVINO:
        xml = folder / openvino_ir.XML
        openvino_ir.export_ir(_calibrated_ptq(fp32, calibration), calibration[0], xml)
        return _openvino_stack(xml, threads)
    if stack == "inductor_fp32":
        return compile_for_inference(copy.deepcopy(fp32)), None
    if stack == "openvino_fp32":
        return _openvino_stack(_openvino_model(fp32, calibration[0]), threads)
    if stack == "openvino_int8":
        import nncf

        dataset = nncf.Dataset([x.numpy() for x in calibration])
        model = _openvino_model(fp32, calibration[0])
        return _openvino_stack(nncf.quantize(model, dataset, subset_size=len(calibration)), threads)
    if stack == "ort_int8":
        return _ort_stack(fp32, calibration, threads, folder)
    raise ValueError(f"unknown stack {stack!r}; known: {', '.join(REQUIRES)}")


def _serve_stack(conn, stack: str, settings: dict) -> None:
    """A stack's process: build it, judge its first output, then time calls on request.

    Replies on `conn`: ("ready", {agreement, build_s, first_call_s}), ("skipped", reason) when
    judged not fit to time or ("failed", reason) when the build failed;
    then to ("warm", b) ("warm", None) and to ("time", b, n) ("times", [ms per call]), to
    ("stop",) nothing. Any failure after "ready" is sent as ("failed", reason)."""
    torch.set_num_threads(settings["threads"])
    calibration, held_out, examples = inputs(
        settings["seed"],
        settings["image_size"],
        settings["calib_batches"],
        settings["calib_batch_size"],
        settings["batch_sizes"],
        settings["frames"],
    )
    fp32 = seeded_model(settings["model_name"], settings["seed"], calibration, settings["weights"])
    with tempfile.TemporaryDirectory(prefix=f"qatdist-{stack}-") as folder, torch.no_grad():
        try:
            start = time.perf_counter()
            forward, kernels = build_stack(
                stack, fp32, calibration, settings["threads"], Path(folder)
            )
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            if stack in (QATDIST, CPP_WRAPPER):  # the first call compiles: count int8 kernels
                output, codes = run_and_get_code(forward, held_out)
                counts = count_quantized_ops("\n".join(codes))
                kernels = (counts["conv"] + counts["linear"], _conv_linear_layers(fp32))
            else:
                output = forward(held_out)
            first_call_s = time.perf_counter() - start
        except Exception as e:  # a peer's failure is reported and the others still run
            conn.send(("failed", f"{type(e).__name__}: {e}"[:500]))
            return
        measured = agreement(output, fp32(held_out), stack)
        if kernels is not None:
            measured["int8_kernels"] = list(kernels)
        if reason := _not_timed(stack, measured):
            conn.send(("skipped", reason))
            return
        conn.send(("ready", {"agreement": measured, "build_s": build_s, "first_s": first_call_s}))
        while (request := conn.recv())[0] != "stop":
            try:
                if request[0] == "warm":  # Inductor compiles each static shape here
                    forward(examples[request[1]])
                    conn.send(("warm", None))
                else:
                    _, b, n = request
                    times = []
                    for _ in range(n):
                        start = time.perf_counter()
                        forward(examples[b])
                        times.append((time.perf_counter() - start) * 1000.0)
                    conn.send(("times", times))
            except Exception as e:
                conn.send(("failed", f"{type(e).__name__}: {e}"[:500]))


class _StackProcess:
    """The parent's handle on one stack's process (`_serve_stack`)."""

    def __init__(self, stack: str, settings: dict) -> None:
        self.stack = stack
        self.conn, child = multiprocessing.Pipe()
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no shared pools
        self.process = context.Process(
            target=_serve_stack, args=(child, stack, settings), daemon=True
        )
        self.process.start()
        child.close()  # only the child holds it now: its death reads as EOF here

    def receive(self, deadline_s: float) -> tuple:
        """The process's next reply; ("failed", why) when it died, ("hung", why) when it gave
        none within `deadline_s` (it is then killed)."""
        give_up = time.monotonic() + deadline_s
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                break
            if time.monotonic() > give_up:
                self.process.kill()
                self.process.join()
                return ("hung", f"no reply within {deadline_s:.0f} s; stopped")
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(5)
            return ("failed", f"its process died (exit code {self.process.exitcode})")

    def ask(self, *request, deadline_s: float) -> tuple:
        try:
            self.conn.send(request)
        except (BrokenPipeError, ConnectionResetError):
            return ("failed", f"its process died (exit code {self.process.exitcode})")
        return self.receive(deadline_s)

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def peer_latency(
    model_name: str,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    image_size: int | tuple[int, int] = 224,
    threads: int = 2,
    calib_batches: int = 4,
    calib_batch_size: int = 8,
    rounds: int = 10,
    per_round: int = 3,
    seed: int = 0,
    stacks: tuple[str, ...] = STACKS,
    weights: str | None = None,
    frames: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
    build_deadline_s: float = BUILD_DEADLINE_S,
    call_deadline_s: float = CALL_DEADLINE_S,
) -> dict:
    """Latency (interleaved medians, ms) of each runnable stack at each batch size, agreement
    with eager fp32, `int8_vs_best_peer` and the fastest qatdist artifact per batch size,
    {stack: reason} for what did not run (`skipped`) and for what was stopped at its deadline
    (`hung`). See the module docstring for the stacks, the agreement criterion and the
    timing; `image_size` is an int (square) or (height, width); `weights`: a trained model's
    state dict instead of random init; `frames`: a folder of images for calibration, agreement
    and timing instead of noise; `progress` receives a line per stack built. Raises
    QatdistStackError when one of qatdist's own stacks fails or hangs."""
    if per_round < 2:
        raise ValueError("per_round must be >= 2: the first call of each run is discarded")
    if unknown := [s for s in stacks if s not in REQUIRES]:
        raise ValueError(f"unknown stack(s) {unknown}; known: {', '.join(REQUIRES)}")
    if CPP_WRAPPER in stacks and QATDIST not in stacks:
        raise ValueError(f"{CPP_WRAPPER} is measured beside {QATDIST}: ask for both")
    settings = {
        "model_name": model_name,
        "seed": seed,
        "threads": threads,
        "image_size": image_size,
        "calib_batches": calib_batches,
        "calib_batch_size": calib_batch_size,
        "batch_sizes": tuple(batch_sizes),
        "weights": weights,
        "frames": frames,
    }
    skipped = missing_packages(stacks)
    hung: dict[str, str] = {}
    agreements: dict[str, dict] = {}
    build_s: dict[str, float] = {}
    running: dict[str, _StackProcess] = {}

    def lost(stack: str, kind: str, reason: str) -> None:
        """A stack that failed or hung: reported, and the others go on (not qatdist's own)."""
        if stack in (*QATDIST_ARTIFACTS, CPP_WRAPPER):
            raise QatdistStackError(f"{model_name}: qatdist's stack {stack} {kind}: {reason}")
        (hung if kind == "hung" else skipped)[stack] = reason
        if stack in running:
            running.pop(stack).close()

    try:
        for stack in (s for s in stacks if s not in skipped):  # one build at a time
            start = time.perf_counter()
            process = _StackProcess(stack, settings)
            kind, detail = process.receive(build_deadline_s)
            if kind != "ready":
                process.close()
                if kind == "skipped":  # judged and not timed (`_not_timed`)
                    skipped[stack] = detail
                else:
                    lost(stack, kind, detail if kind == "hung" else f"build failed: {detail}")
                continue
            running[stack] = process
            agreements[stack] = detail["agreement"]
            build_s[stack] = detail["build_s"]
            build_s[f"{stack}_first_call"] = detail["first_s"]
            progress(f"{stack}: built in {time.perf_counter() - start:.0f} s")
        rows = []
        for b in batch_sizes:
            for stack in list(running):
                kind, detail = running[stack].ask("warm", b, deadline_s=call_deadline_s)
                if kind != "warm":
                    lost(stack, kind, f"at batch {b}: {detail}")
            times: dict[str, list[float]] = {stack: [] for stack in running}
            for _ in range(rounds):
                for stack in list(running):
                    time.sleep(SETTLE_S)  # the previous stack's threads stop spinning
                    kind, detail = running[stack].ask(
                        "time", b, per_round, deadline_s=call_deadline_s
                    )
                    if kind != "times":
                        lost(stack, kind, f"at batch {b}: {detail}")
                        del times[stack]
                        continue
                    times[stack] += detail[1:]
            ms = {stack: statistics.median(values) for stack, values in times.items()}
            rows.append(
                {
                    "batch_size": b,
                    "ms": ms,
                    "int8_vs_best_peer": int8_vs_best_peer(ms),
                    "fastest_qatdist": fastest_qatdist(ms),
                }
            )
    finally:
        for process in running.values():
            process.close()
    return {
        "model": model_name,
        "image_size": list(frame_of(image_size)),
        "threads": threads,
        "rounds": [rounds, per_round],
        "calibration": [calib_batches, calib_batch_size],
        "weights": weights,
        "frames": frames,
        "rows": rows,
        "agreement": agreements,
        "skipped": skipped,
        "hung": hung,
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
