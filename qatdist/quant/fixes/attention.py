"""Linears called as functions (attention projections and the like) annotated like nn.Linear.

`X86InductorQuantizer` finds linears by their source partition: the innermost
`nn_module_stack` entry must be an `nn.Linear` (or the source function `F.linear`; torch 2.14's
export leaves `source_fn_stack` unset, so the stack decides). A module that calls `F.linear` on
its own parameters inside its forward exports `aten.linear` nodes attributed to itself, and they
stay fp32 (torch 2.14, torchao 0.18):
- `nn.MultiheadAttention`: its input projection (`in_proj_weight`, or `q/k/v_proj_weight`) and
  output projection (`out_proj`, called through `F.multi_head_attention_forward`, not as a
  module): 4 of the 9 linears of a 2-layer torchvision ViT;
- torchvision Swin's `ShiftedWindowAttention(V2)`: `shifted_window_attention` calls `F.linear`
  with `qkv.weight` and `proj.weight`: 24 of the 52 linears of swin_t (swin_v2's `cpb_mlp` is
  called as modules and was annotated already);
- any user module that calls `F.linear(x, self.weight)`.

`attribute_functional_linears` gives every `aten.linear` node whose weight is a parameter
(`get_attr`) and whose innermost module is not an `nn.Linear` an innermost stack entry of its
own: an `nn.Linear` named after its weight (`...self_attention.in_proj`, `...attn.qkv`,
`...attn.proj`), with the capture's `@N` convention when one weight feeds several linears. The
quantizer's linear annotation then applies, and module-name filters still see the module above
it (keeping `...self_attention` or `...attn` in fp32 keeps its projections in fp32 too;
`...attn.qkv` names one projection). A bias computed in the graph (swin_v2 clones the qkv bias
and zeroes its key part) is split off into an fp32 add, which Inductor's int8 linear needs.

It can go when X86InductorQuantizer's linear annotation matches `aten.linear` nodes by op
rather than by source module.
"""

from __future__ import annotations

import torch

from qatdist.quant.capture import add_innermost_module, innermost_module_is


def _weight_owner_path(weight: torch.fx.Node) -> str:
    """`a.self_attention.in_proj_weight` -> `a.self_attention.in_proj`; `a.attn.qkv.weight` ->
    `a.attn.qkv`; any other parameter name is kept whole."""
    target = weight.target
    for suffix in (".weight", "_weight"):
        if target.endswith(suffix):
            return target.removesuffix(suffix)
    return target


def _split_computed_bias(
    gm: torch.fx.GraphModule, linear: torch.fx.Node, bias: torch.fx.Node
) -> None:
    """`linear(x, w, b)` -> `linear(x, w) + b` for a bias computed in the graph.

    Inductor's int8 linear lowering takes its bias as a frozen constant: with swin_v2's cloned and
    partly zeroed qkv bias (a `_generalized_scatter` after functionalization) compiling fails
    with `FakeTensorUpdater cannot recompute metadata for tracked _inductor_lowering_function
    nodes` (torch 2.14). The add stays fp32, in the module that computes the bias."""
    with gm.graph.inserting_after(linear):
        add = gm.graph.call_function(torch.ops.aten.add.Tensor, (linear, bias))
    linear.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
    linear.args = linear.args[:2]
    add.meta = {k: v for k, v in linear.meta.items() if k != "torch_fn"}


def attribute_functional_linears(gm: torch.fx.GraphModule) -> int:
    """Give every `aten.linear` node on a parameter weight whose innermost module is not an
    `nn.Linear` an `nn.Linear` stack entry named after the weight (see the module docstring).
    Returns the number of nodes re-attributed."""
    calls: dict[str, int] = {}
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        if innermost_module_is(node, torch.nn.Linear):
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, torch.fx.Node) and bias.op != "get_attr":
            _split_computed_bias(gm, node, bias)
        # One partition per path: a second call on the same weight gets a path of its own, or a
        # linear feeding another on the same weight would not be an output of the partition.
        add_innermost_module(node, _weight_owner_path(weight), torch.nn.Linear, calls)
        count += 1
    if count:
        gm.recompile()
    return count
