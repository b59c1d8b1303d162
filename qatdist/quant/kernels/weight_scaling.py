"""The conv-BN QAT arithmetic around each convolution, taken inside the weight fake-quant kernels.

`prepare_qat_pt2e` rewrites each conv + BatchNorm so that the convolution sees the weight as
folded BatchNorm would scale it, and the BatchNorm sees the convolution's output unscaled:

    factor = gamma / sqrt(running_var + eps)
    conv   = conv2d(x, fake_quant(weight * factor[:, None, None, None]))
    out    = batch_norm(conv / factor[None, :, None, None], ...)

The `mul` is a pass over the weight forward and two more backward, the `div` a pass over the
conv's output (an activation, often larger than the weight) forward and four backward: eager
ATen ops that were about half of what QAT added to a step (docs/performance.md).

`defer_weight_scaling(gm)` hands both to the weight's `FastFusedFakeQuantize` kernel, which
already reads every weight element: each such `mul` node (when its only user is a per-channel
`FastFusedFakeQuantize`) calls `scaled_weight` instead, so the kernel receives the weight and
the factor unmultiplied and takes the product itself (bitwise the same product, so the same
fake quant, observer and qparams). When the convolution's output then goes only to a `div` by
the same factor, the `mul` calls
`scaled_weight_divided_back` and the `div` calls `divided_in_weight`: the kernel divides each
fake-quantized weight by its channel's factor and the output needs no division (torchao gives a
conv with a bias a zero bias and adds the bias after the division, so that pattern fuses too).
By linearity of
the convolution that is the same computation; it rounds differently, within float32 rounding
(conv(x, w / f) against conv(x, w) / f), and the gradients are the unfused graph's in exact
arithmetic (their sums run in the kernel's order): `tests/test_weight_scaling.py` checks both.

Only node targets change: the graph keeps its nodes, names, arguments and users, so whatever
reads the graph (observer names, layer taps, sync) sees what it saw. `restore_weight_scaling(gm)`
points them back; `convert_pt2e` needs the original `mul` and `div` to recognise the conv-BN
pattern it folds (and fails on a `ScaledWeight` otherwise): `convert_to_int8` restores them on
its copy, and code calling torchao's `convert_pt2e` on a prepared model directly must call
`restore_weight_scaling` first.
"""

from __future__ import annotations

import torch

from qatdist.quant.kernels.fast_fake_quant import (
    FastFusedFakeQuantize,
    divided_in_weight,
    scaled_weight,
    scaled_weight_divided_back,
)

_MUL = torch.ops.aten.mul.Tensor
_DIV = torch.ops.aten.div.Tensor
_RESHAPES = {torch.ops.aten.reshape.default, torch.ops.aten.view.default}
_ZEROS_LIKE = torch.ops.aten.zeros_like.default
_CONVS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
}
# What each stand-in replaces (`restore_weight_scaling`).
_ORIGINAL = {scaled_weight: _MUL, scaled_weight_divided_back: _MUL, divided_in_weight: _DIV}


def _fused_weight_fake_quant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node` is a conv-BN weight scaling whose only user is a per-channel
    `FastFusedFakeQuantize`."""
    if len(node.users) != 1 or len(node.args) != 2 or node.kwargs:
        return False
    weight, scale = node.args
    user = next(iter(node.users))
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return False
    if not isinstance(scale, torch.fx.Node) or user.op != "call_module" or user.args != (node,):
        return False
    module = gm.get_submodule(user.target)
    return type(module) is FastFusedFakeQuantize and module.is_per_channel


def _reshape_source(node) -> torch.fx.Node | None:
    """The tensor a reshape/view node reshapes, else None."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _RESHAPES:
        return node.args[0]
    return None


def _zero_or_no_bias(conv: torch.fx.Node) -> bool:
    """Whether `conv` adds no bias, or torchao's `zeros_like` one (conv(x, w, 0) / f is then
    conv(x, w / f, 0))."""
    bias = conv.args[2] if len(conv.args) > 2 else None
    return bias is None or (isinstance(bias, torch.fx.Node) and bias.target is _ZEROS_LIKE)


def _output_division(mul: torch.fx.Node) -> torch.fx.Node | None:
    """The `div` of the conv output by `mul`'s own factor, when the weight fake quant feeds
    only a conv without a bias of its own whose output goes only to that `div`; else None."""
    fake_quant = next(iter(mul.users))
    if len(fake_quant.users) != 1:
        return None
    conv = next(iter(fake_quant.users))
    if conv.op != "call_function" or conv.target not in _CONVS or conv.kwargs:
        return None
    if conv.args[1] is not fake_quant or not _zero_or_no_bias(conv):
        return None
    if len(conv.users) != 1:
        return None
    div = next(iter(conv.users))
    if div.op != "call_function" or div.target is not _DIV or div.kwargs or len(div.args) != 2:
        return None
    factor = _reshape_source(mul.args[1])
    if div.args[0] is not conv or factor is None or _reshape_source(div.args[1]) is not factor:
        return None
    return div


def defer_weight_scaling(gm: torch.fx.GraphModule) -> int:
    """Let the weight fake quants of `gm` compute its conv-BN weight scaling, and where the
    pattern allows the division of the conv output too (in place); returns how many weight
    scalings moved into the kernels."""
    deferred = 0
    for node in list(gm.graph.nodes):
        if (
            node.op == "call_function"
            and node.target is _MUL
            and _fused_weight_fake_quant(gm, node)
        ):
            division = _output_division(node)
            if division is None:
                node.target = scaled_weight
            else:
                node.target = scaled_weight_divided_back
                division.target = divided_in_weight
            deferred += 1
    if deferred:
        gm.recompile()
    return deferred


def restore_weight_scaling(model: torch.nn.Module) -> int:
    """Undo `defer_weight_scaling` in every graph module of `model` (in place): each stand-in
    node back to the `aten.mul.Tensor` / `aten.div.Tensor` it replaced; returns how many
    weight scalings were restored."""
    restored = 0
    for gm in model.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ORIGINAL]
        for node in nodes:
            restored += node.target is not divided_in_weight
            node.target = _ORIGINAL[node.target]
        if nodes:
            gm.recompile()
    return restored
