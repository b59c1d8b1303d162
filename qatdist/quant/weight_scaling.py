"""The conv-BN QAT weight scaling taken inside the weight fake-quant kernels.

`prepare_qat_pt2e` rewrites each conv + BatchNorm so that the convolution sees the weight as
folded BatchNorm would scale it: `mul(weight, reshape(gamma / sqrt(running_var + eps)))`, then
the weight fake quant. That `mul` is a pass over the weight forward and two more backward (the
weight's and the scale's gradients: `grad * scale`, `sum(grad * weight)`), eager ATen ops that
add up to about a tenth of what QAT adds to a resnet18 step.

`defer_weight_scaling(gm)` points each such `mul` node, when its only user is a
`FastFusedFakeQuantize`, at `scaled_weight` instead: the node hands the module the weight and
the scale unmultiplied, and the module's kernels take the product themselves (forward: the
same product, bitwise; backward: the weight's gradient bitwise, the scale's within float32
rounding, a sum in another order). Only the nodes' targets change: the graph keeps its nodes,
names and arguments, so whatever reads the graph (observer names, layer taps, sync) sees
what it saw. `restore_weight_scaling(gm)` points them back; `convert_pt2e` needs the original
`mul` to recognise the conv-BN pattern it folds (and fails on a `ScaledWeight` otherwise):
`convert_to_int8` restores them on its copy, and code calling torchao's `convert_pt2e` on a
prepared model directly must call `restore_weight_scaling` first.
"""

from __future__ import annotations

import torch

from qatdist.quant.fast_fake_quant import FastFusedFakeQuantize, scaled_weight

_MUL = torch.ops.aten.mul.Tensor


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


def defer_weight_scaling(gm: torch.fx.GraphModule) -> int:
    """Let the weight fake quants of `gm` compute its conv-BN weight scaling (in place);
    returns how many nodes now call `scaled_weight`."""
    deferred = 0
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target is _MUL
            and _fused_weight_fake_quant(gm, node)
        ):
            node.target = scaled_weight
            deferred += 1
    if deferred:
        gm.recompile()
    return deferred


def restore_weight_scaling(model: torch.nn.Module) -> int:
    """Undo `defer_weight_scaling` in every graph module of `model` (in place): each
    `scaled_weight` node back to `aten.mul.Tensor`; returns how many."""
    restored = 0
    for gm in model.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is scaled_weight]
        for node in nodes:
            node.target = _MUL
        if nodes:
            gm.recompile()
        restored += len(nodes)
    return restored
