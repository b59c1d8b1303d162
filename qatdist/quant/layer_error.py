"""Per-layer numerical error of a converted int8 model against its float twin (SQNR in dB), and
the rebuild of a prepared model with other layers kept in fp32 but the same weights and
observer statistics.

torchao's PT2E numeric debugger (`prepare_for_propagation_comparison` / `compare_results`) runs
on a QAT-prepared graph, but it pairs nodes by their origin in the captured graph: a conv
followed by BatchNorm is compared before BatchNorm in the float graph and after the folded
BatchNorm in the int8 graph (13.8 dB for a layer whose ReLU output measured 35.5 dB here). So
each layer's input and output are tapped here at its quantization boundaries in both graphs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from torchao.quantization.pt2e.fake_quantize import (
    FakeQuantizeBase,
    disable_fake_quant,
    disable_observer,
)

from qatdist.config import QuantConfig
from qatdist.quant.capture import capture
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.prepare import prepare_qat
from qatdist.quant.schedule import QatPhase, apply_phase, to_eval

_LAYER_OPS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
}
_QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DEQUANTIZE_PER_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_DEQUANTIZE = torch.ops.quantized_decomposed.dequantize_per_tensor.default

# The error a layer adds is floored at this fraction of its signal: a layer that adds none reads
# as 300 dB, a finite number a JSON report can hold.
_MIN_NOISE_RATIO = 1e-30


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        raise ValueError(f"node {node.name} has no nn_module_stack: cannot name its layer")
    return list(stack.values())[-1][0]


def _is_fake_quant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantizeBase)


def _weight_is_quantized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node):
        return False
    return _is_fake_quant(gm, weight) or weight.target == _DEQUANTIZE_PER_CHANNEL


def _output_tap(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """Where a layer's output enters the next quantized op: the first fake-quant module (float
    graph) or dequantize (int8 graph) down its single-user chain (through BatchNorm, ReLU,
    residual add), else the end of that chain."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op == "output" or user.target in _LAYER_OPS:
            return node
        if _is_fake_quant(gm, user):
            return user
        if user.target == _QUANTIZE:
            # convert_pt2e gives each consumer its own dequantize; they hold the same values
            dequantize = next(iter(user.users))
            if dequantize.target != _DEQUANTIZE:
                raise ValueError(f"{user.name} is not followed by a dequantize node")
            return dequantize
        node = user
    return node


def _input_tap(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """A layer's activation input before its quantization (fake quant or quantize/dequantize)."""
    x = node.args[0]
    if _is_fake_quant(gm, x):
        return x.args[0]
    if x.target == _DEQUANTIZE and x.args[0].target == _QUANTIZE:
        return x.args[0].args[0]
    return x


def quantized_layer_taps(
    gm: torch.fx.GraphModule,
) -> dict[str, tuple[torch.fx.Node, torch.fx.Node]]:
    """Each quantized conv/linear layer (module path, as `quant.fp32_module_names` names it) of
    a prepared or converted graph, and the nodes holding its input (before quantization) and
    its output."""
    taps = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LAYER_OPS:
            if _weight_is_quantized(gm, node):
                taps[_module_path(node)] = (_input_tap(gm, node), _output_tap(gm, node))
    return taps


class _Tapper(torch.fx.Interpreter):
    """Runs a graph and keeps the values of the given nodes."""

    def __init__(self, gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]):
        super().__init__(gm)
        self.wanted = set(nodes)
        self.values: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value.detach()
        return value


def float_twin(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `prepared` in eval mode with fake quantization and observers off: the float
    model with the same (trained) weights."""
    twin = copy.deepcopy(prepared)
    to_eval(twin)
    twin.apply(disable_fake_quant)
    twin.apply(disable_observer)
    return twin


class _NoiseMeter:
    """Signal and error energy of one tensor stream (float reference vs int8)."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0

    def update(self, ref: torch.Tensor, actual: torch.Tensor, what: str) -> None:
        if ref.shape != actual.shape:
            raise ValueError(f"{what}: float {tuple(ref.shape)} vs int8 {tuple(actual.shape)}")
        self.signal += float(ref.double().pow(2).sum())
        self.noise += float((ref.double() - actual.double()).pow(2).sum())

    def noise_ratio(self) -> float:
        return self.noise / max(self.signal, 1e-30)


def layer_sqnr_db(
    prepared: torch.fx.GraphModule,
    batches: Iterable[torch.Tensor],
    int8: torch.fx.GraphModule | None = None,
) -> dict[str, float]:
    """Per quantized layer, the SQNR (dB, lower = more harmful) of the error the layer itself
    adds in the converted int8 model (`int8`, converted from `prepared` when not given) against
    the float twin, over the input `batches`.

    The error at a layer's output includes every earlier layer's; ranked by it, all layers
    after a broken one look broken (measured: 0.1, 0.1, 0.03 dB behind one hostile conv). So the
    layer is charged with its output's noise-to-signal ratio minus its input's (before input
    quantization, so the input quantization is charged to the layer that quantizes it)."""
    float_model = float_twin(prepared)
    int8 = convert_to_int8(prepared) if int8 is None else int8
    float_taps = quantized_layer_taps(float_model)
    int8_taps = quantized_layer_taps(int8)
    if set(float_taps) != set(int8_taps):
        raise ValueError(
            f"quantized layers differ between the float and int8 graphs: "
            f"{sorted(set(float_taps) ^ set(int8_taps))}"
        )
    meters = {(layer, side): _NoiseMeter() for layer in float_taps for side in (0, 1)}
    with torch.no_grad():
        for images in batches:
            ref = _Tapper(float_model, [n for pair in float_taps.values() for n in pair])
            act = _Tapper(int8, [n for pair in int8_taps.values() for n in pair])
            ref.run(images)
            act.run(images)
            for (layer, side), meter in meters.items():
                what = f"layer {layer} {'output' if side else 'input'}"
                ref_value = ref.values[float_taps[layer][side]]
                meter.update(ref_value, act.values[int8_taps[layer][side]], what)
    added = {
        layer: meters[layer, 1].noise_ratio() - meters[layer, 0].noise_ratio()
        for layer in float_taps
    }
    return {
        layer: -10.0 * math.log10(max(ratio, _MIN_NOISE_RATIO)) for layer, ratio in added.items()
    }


def _observer_keys(gm: torch.fx.GraphModule) -> dict[tuple, str]:
    """Fake-quant module name by what it observes: (observed node, consumers). The captured
    graph names nodes the same way whichever layers stay float, so these keys match across
    preparations of one model."""
    keys = {}
    for node in gm.graph.nodes:
        if _is_fake_quant(gm, node):
            observed = node.args[0]
            keys[(observed.name, tuple(sorted(u.name for u in node.users)))] = node.target
    return keys


def transfer_state(source: torch.fx.GraphModule, target: torch.fx.GraphModule) -> None:
    """Copy weights, BatchNorm statistics and the observer/fake-quant state of `source` into
    `target`, a preparation of the same model with other layers kept in fp32. Every observer of
    `target` must have a counterpart in `source` (a float layer only removes observers)."""
    source_state = source.state_dict()
    by_observed = {}
    source_keys = _observer_keys(source)
    for key, name in source_keys.items():
        by_observed.setdefault(key[0], []).append((key[1], name))
    renamed = {}
    for (observed, users), name in _observer_keys(target).items():
        if (observed, users) in source_keys:
            renamed[name] = source_keys[(observed, users)]
        elif len(by_observed.get(observed, [])) == 1:  # a consumer went float: same observer
            renamed[name] = by_observed[observed][0][1]
        else:
            raise ValueError(f"no observer of {observed!r} in the source model to copy from")
    state = {}
    for key in target.state_dict():
        head, dot, rest = key.partition(".")
        source_key = f"{renamed[head]}{dot}{rest}" if head in renamed else key
        if source_key not in source_state:
            raise ValueError(f"{key!r}: no {source_key!r} in the source model")
        state[key] = source_state[source_key]
    target.load_state_dict(state, strict=True)


Rebuild = Callable[[torch.fx.GraphModule, list[str]], torch.fx.GraphModule]


def make_rebuilder(
    fp32_model: torch.nn.Module,
    example: torch.Tensor,
    quant_cfg: QuantConfig,
    phase: QatPhase | None = None,
    dynamic_spatial: bool = False,
) -> Rebuild:
    """A `rebuild(source, fp32_module_names)`: capture (height and width dynamic with
    `dynamic_spatial`) and prepare a copy of `fp32_model` with those layers in fp32, then take
    `source`'s weights and statistics (`transfer_state`) and, when given, switch it to `phase`
    (train mode)."""

    def rebuild(source: torch.fx.GraphModule, fp32_module_names: list[str]) -> torch.fx.GraphModule:
        cfg = dataclasses.replace(quant_cfg, fp32_module_names=list(fp32_module_names))
        graph = capture(copy.deepcopy(fp32_model), example, dynamic_spatial=dynamic_spatial)
        target = prepare_qat(graph, cfg)
        transfer_state(source, target)
        if phase is not None:
            apply_phase(target, phase)
        return target

    return rebuild
