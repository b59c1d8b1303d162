"""Skip torchao's conv-BN pattern rewrites for convolution types a graph does not contain.

`prepare_qat_pt2e` and `convert_pt2e` rewrite conv-BN patterns for conv1d, conv2d,
conv_transpose1d and conv_transpose2d in turn, and each rewrite exports its pattern graphs with
`torch.export` (96 exports in `convert_pt2e` alone). On a CNN with only conv2d, three quarters of
that work finds nothing: measured on resnet18, convert_pt2e spends nearly all its time there.
Inside `only_present_conv_types()`, a rewrite whose conv type is absent returns the graph as is.

It can go when torchao skips the rewrites of conv types a graph does not contain, or caches
the pattern exports.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torchao.quantization.pt2e import qat_utils


def _has_conv(graph_module: torch.fx.GraphModule, conv_fn) -> bool:
    name = conv_fn.__name__  # F.conv2d -> "conv2d", matching aten.conv2d.default
    return any(
        node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] == name
        for node in graph_module.graph.nodes
    )


def _skip_absent(helper):
    @functools.wraps(helper)
    def wrapper(m, conv_fn, *args, **kwargs):
        if not _has_conv(m, conv_fn):
            return m
        return helper(m, conv_fn, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def only_present_conv_types():
    """Within this context, torchao's conv-BN fuse/fold passes skip absent conv types."""
    saved = qat_utils._fuse_conv_bn_qat_helper, qat_utils._fold_conv_bn_qat_helper
    qat_utils._fuse_conv_bn_qat_helper = _skip_absent(saved[0])
    qat_utils._fold_conv_bn_qat_helper = _skip_absent(saved[1])
    try:
        yield
    finally:
        qat_utils._fuse_conv_bn_qat_helper, qat_utils._fold_conv_bn_qat_helper = saved
