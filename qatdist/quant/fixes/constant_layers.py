"""Computations that read only parameters and buffers stay fp32.

Some models compute a tensor from their own weights inside the forward, independent of the
image: swin_v2's continuous position bias runs a 2-layer MLP (`cpb_mlp`, 24 of swin_v2_t's 76
linears) on a fixed coordinate table. Inductor's freezing folds such a computation to a
constant at compile time, so quantizing it saves nothing at run time and only adds rounding
error to a value computed once. `drop_constant_annotations` removes the quantizer's annotations
from these nodes before observers are inserted; `qatdist.quant.inspect.constant_layers` names
the convolutions and linears they contain, so coverage counts them apart ("folded", not "left in
float").

The image-dependent part is what `input_dependent` returns: every node reachable from a graph
input (or, in a prepared graph, from a fake-quant module call, whose state changes in training).

It can go when the quantizer leaves image-independent computations unannotated.
"""

from __future__ import annotations

import torch


def input_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose value depends on a graph input (or on a module call)."""
    dynamic: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:  # topological order
        if node.op in ("placeholder", "call_module") or any(
            a in dynamic for a in node.all_input_nodes
        ):
            dynamic.add(node)
    return dynamic


def drop_constant_annotations(gm: torch.fx.GraphModule) -> int:
    """Remove the quantization annotation of every annotated node that does not depend on the
    graph input (see the module docstring). Returns the number of annotations removed.

    Image-dependent nodes keep theirs, including input specs for edges that come from a
    constant (a bias table added to attention logits is still quantized where it is used, if
    the quantizer asked for that)."""
    dynamic = input_dependent(gm)
    dropped = 0
    for node in gm.graph.nodes:
        if node not in dynamic and node.meta.pop("quantization_annotation", None) is not None:
            dropped += 1
    return dropped
