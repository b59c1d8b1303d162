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
"""

from __future__ import annotations

import torch

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


def _is_module_type(module_type, wanted: type) -> bool:
    """Whether a stack entry's type (a class, or its qualified name) is `wanted` or a subclass."""
    if isinstance(module_type, type):
        return issubclass(module_type, wanted)
    return module_type == f"{wanted.__module__}.{wanted.__qualname__}"


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
        stack = node.meta.get("nn_module_stack") or {}
        if stack and _is_module_type(list(stack.values())[-1][1], module_type):
            continue
        parent_key = list(stack)[-1] if stack else ""
        parent_path = list(stack.values())[-1][0] if stack else ""
        path = f"{parent_path}.{name}" if parent_path else name
        # One partition per call: a second call in the same module gets a path of its own.
        call_index = calls.get(path, 0)
        calls[path] = call_index + 1
        suffix = f"@{call_index}" if call_index else ""
        key = f"{parent_key}.{name}{suffix}" if parent_key else f"{name}{suffix}"
        qualified = f"{module_type.__module__}.{module_type.__qualname__}"
        node.meta["nn_module_stack"] = {**stack, key: (path + suffix, qualified)}
        count += 1
    return count
