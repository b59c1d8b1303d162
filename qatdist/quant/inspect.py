"""Per-layer view of a prepared QAT model: readable names, qparams and weight SQNR.

`prepare_qat_pt2e` inserts fake-quant modules named `activation_post_process_<i>` at the top of
the graph module. `quant_points` maps each to what it quantizes, from the graph:

- a weight fake quant's input is computed from parameters and buffers only (the conv weight, or
  with conv-BN folding `weight * bn.weight / sqrt(bn.running_var + eps)`); it is named after the
  conv/linear that consumes it (`layer1.0.conv1`).
- an activation fake quant is named after the module whose output it observes (innermost
  `nn_module_stack` path of the observed node: `maxpool`, `layer1.0.relu@1`), `input` for the
  graph input; repeated names get a `#<n>` suffix.

`summarize` reads each point's scale / zero point and, for weights, fake-quantizes the weight
as the forward does (the folded weight, the module's current qparams) and measures the
signal-to-quantization-noise ratio against the fp32 weight. Reading does not change the model.

Coverage: `annotated_layers` lists the convolutions / linears the quantizer gave a weight fake
quant (layers kept fp32 by config have none), `float_layers` those of a converted graph whose
weight is not dequantized from int8, `constant_layers` those computed from parameters only
(never annotated: freezing folds them), `count_quantized_ops` the int8 kernel calls in generated
code.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

from qatdist.quant.fixes.constant_layers import input_dependent
from qatdist.quant.kernels.fast_fake_quant import ScaledWeight

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


@dataclass(frozen=True)
class QuantPoint:
    module: str  # the fake-quant module's name in the graph module: activation_post_process_3
    kind: str  # "weight" or "activation"
    layer: str  # readable name: the consuming layer (weights), the observed module (activations)
    observes: str  # graph node the fake quant reads
    feeds: tuple[str, ...]  # module paths of the nodes that consume its output


@dataclass(frozen=True)
class LayerSummary:
    point: QuantPoint
    scale_mean: float
    scale_min: float
    scale_max: float
    zero_point: float  # mean over channels (per-tensor: the zero point)
    sqnr_db: float | None  # weights only; +inf when quantization is exact; None if unavailable


def _module_path(node: torch.fx.Node) -> str:
    """Innermost non-empty nn_module_stack path of `node` ('' when it has none)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path:
            return path
    return ""


def _fake_quant_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """First call node of every fake-quant module, by module name, in graph order."""
    out: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in out:
            if isinstance(gm.get_submodule(node.target), FakeQuantizeBase):
                out[node.target] = node
    return out


def quant_points(gm: torch.fx.GraphModule) -> list[QuantPoint]:
    """Every fake-quant module of a prepared graph module with a readable name, in graph order."""
    dynamic = input_dependent(gm)
    points, used = [], {}
    for name, node in _fake_quant_nodes(gm).items():
        source = node.args[0]
        feeds = tuple(dict.fromkeys(_module_path(u) or u.name for u in node.users))
        if source not in dynamic:
            kind = "weight"
            consumers = [_module_path(u) for u in node.users if _module_path(u)]
            if consumers:
                layer = consumers[0]
            elif source.op == "get_attr":
                layer = source.target.rpartition(".")[0] or source.target
            else:
                layer = name
        else:
            kind = "activation"
            if source.op == "placeholder":
                layer = "input"
            elif source.op == "call_module":
                layer = f"{source.target}.out"
            else:
                layer = _module_path(source) or (f"{feeds[0]}.in" if feeds else source.name)
        key = (kind, layer)
        used[key] = used.get(key, 0) + 1
        if used[key] > 1:
            layer = f"{layer}#{used[key] - 1}"
        points.append(QuantPoint(name, kind, layer, source.name, feeds))
    return points


def _fetch(gm: torch.nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def weight_input(
    gm: torch.fx.GraphModule, point: QuantPoint, nodes: dict[str, torch.fx.Node] | None = None
) -> torch.Tensor:
    """The tensor a weight fake quant receives in the forward (the BN-folded weight under
    conv-BN folding), evaluated from parameters and buffers alone. Raises ValueError when the
    input depends on the graph input or involves an op that mutates its arguments. `nodes`:
    `_fake_quant_nodes(gm)`, when the caller has it already."""
    nodes = _fake_quant_nodes(gm) if nodes is None else nodes
    node = nodes[point.module].args[0]
    cache: dict[torch.fx.Node, object] = {}

    def value(n: torch.fx.Node):
        if n in cache:
            return cache[n]
        if n.op == "get_attr":
            out = _fetch(gm, n.target)
        elif n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                raise ValueError(f"{point.module}: its input mutates state ({n.target})")
            args = torch.fx.node.map_arg(n.args, value)
            kwargs = torch.fx.node.map_arg(n.kwargs, value)
            out = n.target(*args, **kwargs)
        else:
            raise ValueError(f"{point.module}: its input depends on {n.op} {n.name}")
        cache[n] = out
        return out

    with torch.no_grad():
        weight = value(node)
        if isinstance(weight, ScaledWeight):  # quant.fused_weight_scaling: the kernel multiplies
            weight = weight.product()
        return weight.detach()


def fake_quantize(fake_quant: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` quantized and dequantized with the module's current scale / zero point and range
    (per channel along its `ch_axis`, or per tensor), whether or not fake quant is enabled.

    The arithmetic of `torch.fake_quantize_per_*_affine` (round(x * (1 / scale)) + zero point,
    clamped), written out: the fused op is about 4x slower on this path and this runs on
    every weight at each summary."""
    scale = fake_quant.scale.detach().float()
    zero_point = fake_quant.zero_point.detach().float()
    qmin, qmax = int(fake_quant.quant_min), int(fake_quant.quant_max)
    if fake_quant.qscheme in _PER_CHANNEL:
        axis = fake_quant.ch_axis
        if scale.numel() != x.shape[axis]:
            raise ValueError(
                f"{scale.numel()} scales for {x.shape[axis]} channels (not observed yet?)"
            )
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    else:
        scale, zero_point = scale.reshape(-1)[0], zero_point.reshape(-1)[0]
    with torch.no_grad():
        q = torch.round(x * scale.reciprocal()).add_(zero_point).clamp_(qmin, qmax)
        return q.sub_(zero_point).mul_(scale)


def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||reference|| / ||reference -
    quantized||); +inf when the two are equal."""
    with torch.no_grad():
        signal = float(torch.linalg.vector_norm(reference.detach().float()))
        noise = float(torch.linalg.vector_norm((reference - quantized).detach().float()))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


def summarize(
    gm: torch.fx.GraphModule, points: list[QuantPoint] | None = None
) -> list[LayerSummary]:
    """Scale statistics and zero point of every point, and weight SQNR (dB) of weight points.
    Pass `points` (from `quant_points`) to skip re-reading the graph."""
    points = quant_points(gm) if points is None else points
    nodes = _fake_quant_nodes(gm)
    out = []
    for point in points:
        fq = gm.get_submodule(point.module)
        scale = fq.scale.detach().double()
        sqnr = None
        if point.kind == "weight":
            try:
                weight = weight_input(gm, point, nodes)
                sqnr = sqnr_db(weight, fake_quantize(fq, weight))
            except (ValueError, RuntimeError):
                sqnr = None  # e.g. not observed yet: per-channel scale of the wrong size
        out.append(
            LayerSummary(
                point=point,
                scale_mean=float(scale.mean()),
                scale_min=float(scale.min()),
                scale_max=float(scale.max()),
                zero_point=float(fq.zero_point.detach().double().mean()),
                sqnr_db=sqnr,
            )
        )
    return out


def points_table(points: list[QuantPoint]) -> str:
    """Markdown table: fake-quant module, kind, readable name, observed node, consumers."""
    lines = ["| module | kind | layer | observes | feeds |", "| --- | --- | --- | --- | --- |"]
    for p in points:
        lines.append(f"| {p.module} | {p.kind} | {p.layer} | {p.observes} | {', '.join(p.feeds)} |")
    return "\n".join(lines)


# Calls of the oneDNN int8 kernels in Inductor's Python wrapper (`torch.ops.onednn.qconv_...(`)
# and in AOTInductor's C++ wrapper (`aoti_torch_cpu__qconv_...(`), as torch 2.14 writes them:
# qconv_pointwise, qconv2d_pointwise.binary (conv + add), qlinear_pointwise(.binary).
_QUANTIZED_CALL = re.compile(
    r"(?:torch\.ops\.onednn\.|aoti_torch_cpu__)q(conv|linear)\w*(?:\.\w+)?\("
)
_LAYER_OP = re.compile(r"^aten\.(conv|linear)")


def count_quantized_ops(code: str) -> dict[str, int]:
    """Quantized convolution and linear kernel calls in generated (Python or C++) code."""
    counts = {"conv": 0, "linear": 0}
    for match in _QUANTIZED_CALL.finditer(code):
        counts[match.group(1)] += 1
    return counts


def _layer_nodes(gm: torch.fx.GraphModule):
    """(kind "conv" | "linear", node, module path) of every aten convolution / linear call."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        match = _LAYER_OP.match(str(node.target))
        if match:
            yield match.group(1), node, _module_path(node) or node.name


def annotated_layers(prepared: torch.fx.GraphModule) -> dict[str, list[str]]:
    """{"conv": names, "linear": names} of the layers of a prepared model whose weight passes
    through a fake quant: what the quantizer annotated (fp32-kept layers are absent)."""
    out: dict[str, list[str]] = {"conv": [], "linear": []}
    for kind, node, name in _layer_nodes(prepared):
        weight = node.args[1]
        if (
            isinstance(weight, torch.fx.Node)
            and weight.op == "call_module"
            and isinstance(prepared.get_submodule(weight.target), FakeQuantizeBase)
        ):
            out[kind].append(name)
    return out


def constant_layers(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """{"conv": names, "linear": names} of the convolutions / linears of a captured or prepared
    graph computed from parameters and buffers only (left fp32, folded by freezing)."""
    dynamic = input_dependent(gm)
    out: dict[str, list[str]] = {"conv": [], "linear": []}
    for kind, node, name in _layer_nodes(gm):
        if node not in dynamic:
            out[kind].append(name)
    return out


def float_layers(converted: torch.fx.GraphModule) -> list[str]:
    """Names of the convolutions / linears of a converted model whose weight is not
    dequantized from int8 (they run in float, whatever the lowering does)."""
    names = []
    for _, node, name in _layer_nodes(converted):
        weight = node.args[1]
        if not (isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target)):
            names.append(name)
    return names
