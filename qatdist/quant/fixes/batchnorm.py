"""BatchNorm eps and momentum as the model defined them, through preparation and convert.

torchao 0.18's QAT conv-BN rewrite (`prepare_qat_pt2e`) replaces every conv-BN pair with a
pattern built with the defaults eps=1e-5, momentum=0.1 (pytorch/ao#4107): the new
`aten.batch_norm` node carries them, and so does the `running_var + eps` that scales the weight
before its fake quant. `convert_pt2e` then folds BN into the conv with the eps of its own
replacement pattern (1e-5 again). mobilenet_v3 uses eps=1e-3, momentum=0.01.

A captured graph still holds the model's own values (export records each BatchNorm's literals),
so they are read from it before preparation (`bn_literals`), put back after it
(`restore_bn_literals`), and handed to the convert-time fold (`fold_with_model_bn_eps`). BatchNorms
are keyed by their running-mean buffer, which every rewrite keeps.

It can go when torchao's conv-BN QAT rewrite and fold keep the model's BatchNorm literals
(pytorch/ao#4107).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torchao.quantization.pt2e import qat_utils

_BATCH_NORM = torch.ops.aten.batch_norm.default
_ADD = torch.ops.aten.add.Tensor
_MOMENTUM, _EPS = 6, 7  # aten.batch_norm.default argument positions


@dataclass(frozen=True)
class BnLiterals:
    momentum: float
    eps: float


def _running_mean_key(bn_node: torch.fx.Node) -> str | None:
    running_mean = bn_node.args[3]
    if isinstance(running_mean, torch.fx.Node) and running_mean.op == "get_attr":
        return running_mean.target
    return None  # no running statistics (track_running_stats=False): nothing to key by


def batch_norm_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's `aten.batch_norm.default` nodes (training IR)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == _BATCH_NORM]


def bn_literals(gm: torch.fx.GraphModule) -> dict[str, BnLiterals]:
    """Momentum and eps of every BatchNorm of `gm`, by running-mean buffer name."""
    out = {}
    for node in batch_norm_nodes(gm):
        key = _running_mean_key(node)
        if key is not None:
            out[key] = BnLiterals(momentum=node.args[_MOMENTUM], eps=node.args[_EPS])
    return out


def set_args(node: torch.fx.Node, values: dict[int, object]) -> bool:
    """Set `node`'s positional arguments at the given indices; whether anything changed."""
    args = list(node.args)
    for index, value in values.items():
        args[index] = value
    changed = tuple(args) != node.args
    node.args = tuple(args)
    return changed


def restore_bn_literals(gm: torch.fx.GraphModule, saved: dict[str, BnLiterals]) -> int:
    """Put `saved` momentum/eps back on each BatchNorm of `gm`, and eps on the QAT weight
    scaling (`sqrt(running_var + eps)`) that the conv-BN rewrite computes beside it, so the
    fake-quantized weight is the one convert folds. Returns the number of nodes changed."""
    changed = 0
    for node in batch_norm_nodes(gm):
        literals = saved.get(_running_mean_key(node))
        if literals is None:
            continue
        changed += set_args(node, {_MOMENTUM: literals.momentum, _EPS: literals.eps})
        running_var = node.args[4]
        for user in list(running_var.users):
            if (
                user.target == _ADD
                and user.args[0] is running_var
                and isinstance(user.args[1], float)
            ):
                changed += set_args(user, {1: literals.eps})
    if changed:
        gm.recompile()
    return changed


def _set_eps(bn_node: torch.fx.Node, eps: float) -> None:
    """eps of a training-IR or no-training BatchNorm node, positional or keyword."""
    no_training = bn_node.target == torch.ops.aten._native_batch_norm_legit_no_training.default
    index = _EPS - 1 if no_training else _EPS
    if len(bn_node.args) > index:
        set_args(bn_node, {index: eps})
    else:
        bn_node.kwargs = {**bn_node.kwargs, "eps": eps}


@contextlib.contextmanager
def fold_with_model_bn_eps(prepared: torch.fx.GraphModule) -> Iterator[None]:
    """Within this context, `convert_pt2e`'s conv-BN fold uses each BatchNorm's eps as
    `prepared`'s graph holds it, instead of its replacement pattern's 1e-5."""
    saved = bn_literals(prepared)
    fold = qat_utils.fold_bn_weights_into_conv_node

    def fold_with_eps(conv_node, conv_weight, conv_bias, bn_node, m):
        literals = saved.get(_running_mean_key(bn_node))
        if literals is not None:
            _set_eps(bn_node, literals.eps)
        return fold(conv_node, conv_weight, conv_bias, bn_node, m)

    qat_utils.fold_bn_weights_into_conv_node = fold_with_eps
    try:
        yield
    finally:
        qat_utils.fold_bn_weights_into_conv_node = fold
