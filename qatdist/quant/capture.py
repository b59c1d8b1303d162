"""Graph capture: torch.export training IR with a dynamic batch dimension (and dynamic height
and width for dense predictors, which train on crops and evaluate on full frames)."""

from __future__ import annotations

import torch
from torch.export import Dim

from qatdist.quant.fixes.symbolic_sizes import detach_size_arithmetic


def capture(
    model: torch.nn.Module, example_input: torch.Tensor, *, dynamic_spatial: bool = False
) -> torch.fx.GraphModule:
    """Export `model` (training IR) with a dynamic batch dimension and return the graph module.
    `dynamic_spatial`: height and width are dynamic too (`Dim.AUTO`: the constraints the
    model's strides imply are found by export), so one graph runs at any frame size.

    Shared-module call sites are made distinct (see `make_call_sites_distinct`) so that the
    quantizer can annotate them.
    """
    batch = Dim("batch", min=1, max=65536)
    dims = {0: batch, 2: Dim.AUTO, 3: Dim.AUTO} if dynamic_spatial else {0: batch}
    exported = torch.export.export(model, (example_input,), dynamic_shapes=(dims,))
    graph_module = exported.module()
    make_call_sites_distinct(graph_module)
    if dynamic_spatial:
        detach_size_arithmetic(graph_module)
    return graph_module


def make_call_sites_distinct(graph_module: torch.fx.GraphModule) -> int:
    """Give each call of a shared module (ResNet's one `self.relu` used twice) its own path.

    `X86InductorQuantizer` groups nodes into partitions by the module path of the innermost
    `nn_module_stack` entry; two calls of one module then form one partition with two outputs,
    and `prepare_qat_pt2e` fails with "Input partition has more than one output node". The
    stack's key already tells the calls apart (`...relu` vs `...relu@1`), so the path takes the
    key's `@N` suffix. Returns the number of stack entries renamed.
    """
    renamed = 0
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        fixed = {}
        for key, (path, module_type) in stack.items():
            _, at, call_index = key.rpartition("@")
            if at and call_index.isdigit() and not path.endswith(f"@{call_index}"):
                path = f"{path}@{call_index}"
                renamed += 1
            fixed[key] = (path, module_type)
        node.meta["nn_module_stack"] = fixed
    return renamed


def innermost_module_is(node: torch.fx.Node, module_type: type) -> bool:
    """Whether `node`'s innermost `nn_module_stack` entry is `module_type` (or a subclass): what
    the quantizer's source partitions match. Entries hold a class or its qualified name."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    entry_type = list(stack.values())[-1][1]
    if isinstance(entry_type, type):
        return issubclass(entry_type, module_type)
    return entry_type == f"{module_type.__module__}.{module_type.__qualname__}"


def add_innermost_module(
    node: torch.fx.Node, path: str, module_type: type, calls: dict[str, int]
) -> None:
    """Give `node` an innermost `nn_module_stack` entry: a `module_type` module at `path`, so
    that the quantizer matches it like a real one. `calls` counts the paths given so far: a
    repeated path gets the capture's `@N` suffix (one partition per call, as
    `make_call_sites_distinct` does for real modules)."""
    call_index = calls.get(path, 0)
    calls[path] = call_index + 1
    if call_index:
        path = f"{path}@{call_index}"
    stack = node.meta.get("nn_module_stack") or {}
    parent_key = list(stack)[-1] if stack else ""
    key = f"{parent_key}.{path.rpartition('.')[2]}" if parent_key else path
    qualified = f"{module_type.__module__}.{module_type.__qualname__}"
    node.meta["nn_module_stack"] = {**stack, key: (path, qualified)}
