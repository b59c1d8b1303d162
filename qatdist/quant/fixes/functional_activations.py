"""Activations called as functions (`F.relu(x, inplace=True)`) fused with their convolution.

`X86InductorQuantizer` fuses conv-BN-ReLU (and Hardtanh, SiLU, Hardswish) by source partitions.
torch 2.14's export leaves `source_fn_stack` unset; the partition matcher then reads
`torch_fn` (`"function.relu"`, a name that matches no partition type: the types are
`nn.ReLU`, `F.relu`, `F.relu_`) and falls back to the innermost `nn_module_stack` entry, which for
`F.relu` inside a module's forward is that module (torchvision's `BasicConv2d` in googlenet and
inception_v3, most user code). The ReLU then stays out of the fusion: the convolution's output
is quantized before the ReLU, the ReLU and the max pool after it run in float
(measured on googlenet at 32x32: all 57 ReLUs and 13 max pools in float, "The input of maxpool2d
is not quantized"; with the re-attribution all of them run int8).

`attribute_functional_activations` gives every such activation node an innermost stack entry of
the module type the quantizer looks for, named `<module>.relu` (`<module>.relu@1` for a second
call in the same module), so the fusion applies; module-name filters still see the module above.

It can go when torch.export fills `source_fn_stack` again, or the partition matcher reads
`torch_fn` names such as "function.relu".
"""

from __future__ import annotations

import torch

from qatdist.quant.capture import add_innermost_module, innermost_module_is

_aten = torch.ops.aten
# aten op -> (module type whose partitions the quantizer matches, name of the stack entry)
_ACTIVATIONS: dict = {
    _aten.relu.default: (torch.nn.ReLU, "relu"),
    _aten.relu_.default: (torch.nn.ReLU, "relu"),
    _aten.hardtanh.default: (torch.nn.Hardtanh, "hardtanh"),
    _aten.hardtanh_.default: (torch.nn.Hardtanh, "hardtanh"),
    _aten.silu.default: (torch.nn.SiLU, "silu"),
    _aten.silu_.default: (torch.nn.SiLU, "silu"),
    _aten.hardswish.default: (torch.nn.Hardswish, "hardswish"),
    _aten.hardswish_.default: (torch.nn.Hardswish, "hardswish"),
}


def attribute_functional_activations(gm: torch.fx.GraphModule) -> int:
    """Give every activation node (see `_ACTIVATIONS`) whose innermost module is not of its
    module type an innermost stack entry of that type (see the module docstring). Returns the
    number of nodes re-attributed."""
    calls: dict[str, int] = {}
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _ACTIVATIONS:
            continue
        module_type, name = _ACTIVATIONS[node.target]
        if innermost_module_is(node, module_type):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        parent_path = list(stack.values())[-1][0] if stack else ""
        # One partition per call: a second call in the same module gets a path of its own.
        path = f"{parent_path}.{name}" if parent_path else name
        add_innermost_module(node, path, module_type, calls)
        count += 1
    return count
