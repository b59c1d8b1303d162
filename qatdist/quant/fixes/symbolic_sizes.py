"""Size arithmetic of a capture with dynamic height and width, kept out of the quantizer's
module partitions.

With dynamic height and width (`capture(..., dynamic_spatial=True)`, dense predictors),
torch.export (torch 2.14) records the integer arithmetic on symbolic sizes (`sym_size`,
`floordiv`, `add` of SymInts, e.g. the output size of a max pool that a later `interpolate` to a
skip connection's size needs) with the `source_fn_stack` of the module being traced when it was
first computed, often a BatchNorm2d. `get_source_partitions`, which `X86InductorQuantizer`'s
conv-bn(-relu) annotation uses, then puts those nodes into the BatchNorm's partition, which
gets several output nodes, and annotation fails with "Input partition has more than one output
node" (a small UNet: `floordiv` nodes in the partition of `enc2.1`). Size arithmetic is never
quantized: dropping its source metadata leaves the partitions as in a static capture. It can go
when torch.export stops attributing SymInt nodes to the module being traced.
"""

from __future__ import annotations

import torch

_SOURCE_KEYS = ("source_fn_stack", "nn_module_stack")


def detach_size_arithmetic(graph_module: torch.fx.GraphModule) -> int:
    """Drop the module source metadata of every node computing a symbolic size (its value is a
    SymInt, not a tensor); returns how many nodes changed."""
    changed = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.SymInt):
            continue
        if any(key in node.meta for key in _SOURCE_KEYS):
            for key in _SOURCE_KEYS:
                node.meta.pop(key, None)
            changed += 1
    return changed
