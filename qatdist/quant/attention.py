"""Attention projections annotated like any other linear.

`X86InductorQuantizer` finds linears by their source partition: the innermost
`nn_module_stack` entry must be an `nn.Linear` (or the source function `F.linear`).
`nn.MultiheadAttention` computes its input projection (`in_proj_weight`, or
`q/k/v_proj_weight`) and its output projection (`out_proj`, called through
`F.multi_head_attention_forward`, not as a module) with `F.linear` inside its own forward, so the
exported `aten.linear` nodes are attributed to the MultiheadAttention module and stay fp32: 4 of
the 9 linears of a 2-layer torchvision ViT (torch 2.14, torchao 0.18).

`attribute_attention_projections` gives each such node an innermost stack entry of its own, an
`nn.Linear` named after its weight (`...self_attention.in_proj`, `...self_attention.out_proj`),
so the quantizer's linear annotation applies, and module-name filters still see the attention
module above it (keeping `...self_attention` in fp32 keeps its projections in fp32 too).
"""

from __future__ import annotations

import torch

_LINEAR = "torch.nn.modules.linear.Linear"
_ATTENTION = torch.nn.MultiheadAttention


def _is_attention(module_type) -> bool:
    if isinstance(module_type, type):
        return issubclass(module_type, _ATTENTION)
    return module_type == f"{_ATTENTION.__module__}.{_ATTENTION.__qualname__}"


def _projection_path(weight: torch.fx.Node) -> str:
    """`a.self_attention.in_proj_weight` -> `a.self_attention.in_proj`; `a.out_proj.weight` ->
    `a.out_proj`."""
    target = weight.target
    for suffix in (".weight", "_weight"):
        if target.endswith(suffix):
            return target.removesuffix(suffix)
    return target


def attribute_attention_projections(gm: torch.fx.GraphModule) -> int:
    """Re-attribute the `aten.linear` nodes of every MultiheadAttention to an `nn.Linear` stack
    entry (see the module docstring). Returns the number of nodes re-attributed."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        stack = node.meta.get("nn_module_stack")
        weight = node.args[1]
        if not stack or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        key, (_, module_type) = list(stack.items())[-1]
        if not _is_attention(module_type):
            continue
        path = _projection_path(weight)
        node.meta["nn_module_stack"] = {
            **stack,
            f"{key}.{path.rpartition('.')[2]}": (path, _LINEAR),
        }
        count += 1
    return count
