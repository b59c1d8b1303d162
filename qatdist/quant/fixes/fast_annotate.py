"""A linear-time `find_sequential_partitions` for X86InductorQuantizer's fusion annotations.

torchao 0.18's `find_sequential_partitions(gm, [Conv2d, BatchNorm2d, add, ReLU])` builds the
full product of the partitions of each type and checks every candidate tuple pairwise
(`check_subgraphs_connected`). On densely connected graphs that product is huge: densenet121 at
32x32 spent over 9 minutes in it. `find_sequential_partitions_fast` returns the same list in the
same order (the product's lexicographic order filtered by connection) by following each
partition's users to the partitions of the next type instead of trying every pair.

It can go when torchao's `find_sequential_partitions` stops enumerating the full product.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.fx.passes.utils.source_matcher_utils import SourcePartition, get_source_partitions
from torchao.quantization.pt2e import graph_utils
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer


def _typed_partitions(
    gm: torch.fx.GraphModule, partition_type: Any, filter_fn: Callable | None
) -> list[SourcePartition]:
    types_to_match = graph_utils._get_matching_types(partition_type)
    partitions = get_source_partitions(gm.graph, types_to_match, filter_fn)
    return list(itertools.chain.from_iterable(partitions.values()))


def _successors(sources: list[SourcePartition], targets: list[SourcePartition]) -> list[list[int]]:
    """For each source partition, the sorted indices of the target partitions that use one of
    its nodes (what `check_subgraphs_connected(source, target)` answers)."""
    owners: dict[torch.fx.Node, list[int]] = {}
    for index, partition in enumerate(targets):
        for node in partition.nodes:
            owners.setdefault(node, []).append(index)
    out = []
    for partition in sources:
        connected = {
            i for node in partition.nodes for user in node.users for i in owners.get(user, ())
        }
        out.append(sorted(connected))
    return out


def find_sequential_partitions_fast(
    gm: torch.fx.GraphModule,
    partition_types: list[Any],
    include_functional_equivalent: bool = True,
    filter_fn: Callable[[torch.fx.Node], bool] | None = None,
) -> list[tuple[SourcePartition, ...]]:
    """Same signature and result as torchao's `find_sequential_partitions`."""
    if not graph_utils._valid_type_sequence(partition_types):
        raise ValueError(
            f"Invalid partition types: {partition_types}. Each type in the sequence must be unique"
        )
    typed = [_typed_partitions(gm, t, filter_fn) for t in partition_types]
    links = [_successors(typed[i], typed[i + 1]) for i in range(len(typed) - 1)]
    fused: list[tuple[SourcePartition, ...]] = []

    def extend(chain: tuple[int, ...]) -> None:
        depth = len(chain)
        if depth == len(typed):
            fused.append(tuple(typed[d][i] for d, i in enumerate(chain)))
            return
        for index in links[depth - 1][chain[-1]]:
            extend((*chain, index))

    if not typed:
        return [()]  # the product of no lists: one empty tuple
    if all(typed):
        for first in range(len(typed[0])):
            extend((first,))
    return fused


@contextlib.contextmanager
def fast_sequential_partitions() -> Iterator[None]:
    """Within this context, X86InductorQuantizer's annotations use the fast search."""
    saved = x86_inductor_quantizer.find_sequential_partitions
    x86_inductor_quantizer.find_sequential_partitions = find_sequential_partitions_fast
    try:
        yield
    finally:
        x86_inductor_quantizer.find_sequential_partitions = saved
