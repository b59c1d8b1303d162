"""The QAT schedule: when fake quantization turns on, when observers and BatchNorm freeze.

A prepared model is an exported graph module: there are no BatchNorm modules to `.eval()`, and
torchao's `move_exported_model_to_train/eval` rewrite every `aten.batch_norm.default` node's
`training` argument by pattern replacement. Measured with torchao 0.18:

- `move_exported_model_to_train` sets `training=True` on every BatchNorm, frozen or not, so a
  freeze is re-applied after it (`to_train`). Both calls are no-ops when the model's
  `_exported_training` flag already says the target mode.
- The replacement patterns carry default literals (ignore_literals=True matches any value), so
  each switch resets BatchNorm momentum/eps to 0.1/1e-5 and dropout p to 0.5. `to_train` and
  `to_eval` put the model's own values back.
- `num_batches_tracked` is incremented by a separate `add_` node that no switch touches, so it
  counted eval batches too. Here the increment is 0 in eval mode and while BatchNorm is frozen.

torchvision's StochasticDepth is captured in train mode as a random row/batch mask,
`empty -> bernoulli_(survival) -> div_(survival) -> mul(input, mask)` (`div_` only when the
survival rate is > 0, `bernoulli_`'s p left out when it is the default 0.5), which no torchao
switch touches. `to_eval` sets both literals to 1.0 (mask of ones: the input unchanged, as
torchvision's eval), keeping the train-mode values in each node's meta; `to_train` puts them
back. The meta survives deep copies, so a converted copy is neutralised the same way.

BatchNorm frozen means: the running statistics are used and not updated, in train mode too.
Whether it is frozen is kept in the graph (train mode) and in a `_qatdist_bn_frozen` attribute
(eval mode, where every BatchNorm uses running statistics anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
from torchao.quantization.pt2e.fake_quantize import (
    FakeQuantizeBase,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)

from qatdist.config import QuantConfig
from qatdist.quant.fixes.batchnorm import (
    batch_norm_nodes,
    bn_literals,
    restore_bn_literals,
    set_args,
)

# torchao's own train/eval flag (torchao.quantization.pt2e.export_utils._EXPORTED_TRAINING_ATTR);
# a freshly captured graph has none and is in train mode.
_TRAINING_ATTR = "_exported_training"
_BN_FROZEN_ATTR = "_qatdist_bn_frozen"
_DROPOUT = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)
_ADD_ = torch.ops.aten.add_.Tensor
_EMPTY = torch.ops.aten.empty.memory_format
_BERNOULLI_ = torch.ops.aten.bernoulli_.float
_DIV_ = torch.ops.aten.div_.Tensor
# node.meta key: a stochastic-depth literal's train-mode value while the graph is in eval mode
_TRAIN_LITERAL = "qatdist_train_literal"
_BERNOULLI_DEFAULT_P = None  # saved for a `bernoulli_` whose p export left out (the default)


@dataclass(frozen=True)
class QatPhase:
    fake_quant_on: bool  # fake quantization in the forward (fp32 otherwise)
    observers_frozen: bool  # observers no longer update; scale/zero_point stay fixed
    bn_frozen: bool  # BatchNorm uses and keeps its running statistics


def phase_at(step: int, cfg: QuantConfig) -> QatPhase:
    """The phase after `step` optimizer steps; freeze steps of -1 mean never."""
    return QatPhase(
        fake_quant_on=step >= cfg.fake_quant_start_step,
        observers_frozen=0 <= cfg.observer_freeze_step <= step,
        bn_frozen=0 <= cfg.bn_freeze_step <= step,
    )


def _graph_module(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The outermost graph module of `model` (the model itself, or the one a DDP wraps)."""
    for module in model.modules():
        if isinstance(module, torch.fx.GraphModule):
            return module
    raise TypeError(f"expected an exported/prepared graph module, got {type(model).__name__}")


def _is_training(gm: torch.fx.GraphModule) -> bool:
    return getattr(gm, _TRAINING_ATTR, True)


def _dropout_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _DROPOUT]


def _counter_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The `num_batches_tracked.add_(1)` nodes that export emits beside each BatchNorm."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == _ADD_:
            target = node.args[0]
            if (
                isinstance(target, torch.fx.Node)
                and target.op == "get_attr"
                and target.target.rpartition(".")[2] == "num_batches_tracked"
            ):
                out.append(node)
    return out


def _set_bn_training(gm: torch.fx.GraphModule, training: bool) -> None:
    """`training` on every batch_norm node, and the batch counter increment (1 or 0) to match."""
    changed = False
    for node in batch_norm_nodes(gm):
        changed |= set_args(node, {5: training})
    for node in _counter_nodes(gm):
        changed |= set_args(node, {1: 1 if training else 0})
    if changed:
        gm.recompile()


def freeze_bn(model: torch.nn.Module) -> None:
    """BatchNorm uses its running statistics and stops updating them, in train mode too."""
    gm = _graph_module(model)
    setattr(gm, _BN_FROZEN_ATTR, True)
    if _is_training(gm):
        _set_bn_training(gm, False)


def unfreeze_bn(model: torch.nn.Module) -> None:
    """BatchNorm normalises with batch statistics and updates running ones again in train mode
    (in eval mode the graph is left as it is until `to_train`)."""
    gm = _graph_module(model)
    setattr(gm, _BN_FROZEN_ATTR, False)
    if _is_training(gm):
        _set_bn_training(gm, True)


def apply_phase(model: torch.nn.Module, phase: QatPhase) -> None:
    """Switch fake quantization and observers of every fake-quant module, and freeze or
    unfreeze BatchNorm, as `phase` says."""
    model.apply(enable_fake_quant if phase.fake_quant_on else disable_fake_quant)
    model.apply(disable_observer if phase.observers_frozen else enable_observer)
    if phase.bn_frozen:
        freeze_bn(model)
    else:
        unfreeze_bn(model)


def _literals(gm: torch.fx.GraphModule) -> tuple[dict, list]:
    """BatchNorm momentum/eps by running-mean buffer, and dropout p in graph order."""
    dropout = [n.args[1] for n in _dropout_nodes(gm)]
    return bn_literals(gm), dropout


def _restore_literals(gm: torch.fx.GraphModule, saved: tuple[dict, list]) -> None:
    bn, dropout = saved
    changed = restore_bn_literals(gm, bn)  # recompiles what it changed
    nodes = _dropout_nodes(gm)
    if len(nodes) == len(dropout):  # the rewrite keeps the order; anything else: leave it
        for node, p in zip(nodes, dropout):
            changed |= set_args(node, {1: p})
    if changed:
        gm.recompile()


def _stochastic_depth_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The `bernoulli_` nodes that draw a stochastic-depth mask into a fresh `empty` tensor, each
    followed by the `div_` by the survival rate when there is one."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != _BERNOULLI_:
            continue
        noise = node.args[0]
        if not (isinstance(noise, torch.fx.Node) and noise.target == _EMPTY):
            continue
        out.append(node)
        scale = list(node.users)
        if len(scale) == 1 and scale[0].target == _DIV_ and scale[0].args[0] is node:
            if isinstance(scale[0].args[1], (int, float)):
                out.append(scale[0])
    return out


def eval_neutralized_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The random nodes `to_eval` makes deterministic: dropout (its `train` flag) and the
    stochastic-depth mask (p 1.0)."""
    return [*_dropout_nodes(gm), *_stochastic_depth_nodes(gm)]


def _mask_literal(node: torch.fx.Node) -> float | None:
    """`bernoulli_`'s p (None when left out) or `div_`'s divisor."""
    if node.target == _BERNOULLI_:
        return node.kwargs.get("p", node.args[1] if len(node.args) > 1 else _BERNOULLI_DEFAULT_P)
    return node.args[1]


def _set_mask_literal(node: torch.fx.Node, value: float | None) -> bool:
    if _mask_literal(node) == value and "p" not in node.kwargs:
        return False
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "p"}
    node.args = (node.args[0],) if value is _BERNOULLI_DEFAULT_P else (node.args[0], value)
    return True


def _set_stochastic_depth_identity(gm: torch.fx.GraphModule) -> bool:
    """Every stochastic-depth mask all ones (p 1.0, divisor 1.0); the train-mode literal is
    kept in the node's meta unless an earlier switch kept it already."""
    changed = False
    for node in _stochastic_depth_nodes(gm):
        node.meta.setdefault(_TRAIN_LITERAL, _mask_literal(node))
        changed |= _set_mask_literal(node, 1.0)
    return changed


def _restore_stochastic_depth(gm: torch.fx.GraphModule) -> bool:
    changed = False
    for node in _stochastic_depth_nodes(gm):
        if _TRAIN_LITERAL in node.meta:
            changed |= _set_mask_literal(node, node.meta.pop(_TRAIN_LITERAL))
    return changed


def to_train(model: torch.nn.Module, phase: QatPhase) -> None:
    """Train mode (torchao's rewrite), with the model's own BatchNorm/dropout/stochastic-depth
    literals and the BatchNorm freeze of `phase` applied again."""
    gm = _graph_module(model)
    saved = _literals(gm)
    move_exported_model_to_train(gm)
    _restore_literals(gm, saved)
    if _restore_stochastic_depth(gm):
        gm.recompile()
    if phase.bn_frozen:
        freeze_bn(gm)
    else:
        unfreeze_bn(gm)


def to_eval(model: torch.nn.Module) -> None:
    """Eval mode (torchao's rewrite), keeping the model's own BatchNorm/dropout literals;
    stochastic depth passes its input unchanged and eval forwards don't count batches."""
    gm = _graph_module(model)
    saved = _literals(gm)
    move_exported_model_to_eval(gm)
    _restore_literals(gm, saved)
    if _set_stochastic_depth_identity(gm):
        gm.recompile()
    _set_bn_training(gm, False)


def _all_or_none(values: list[bool], what: str) -> bool:
    if any(values) and not all(values):
        raise ValueError(f"current_phase: {what} is on for some modules and off for others")
    return bool(values) and all(values)


def current_phase(model: torch.nn.Module) -> QatPhase:
    """The phase the model is in, read from its fake-quant buffers and its graph.

    Raises ValueError when the modules disagree (e.g. fake quant on for some only)."""
    fake_quants = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    fake_quant_on = _all_or_none([bool(m.fake_quant_enabled[0]) for m in fake_quants], "fake quant")
    frozen = _all_or_none([not bool(m.observer_enabled[0]) for m in fake_quants], "observer freeze")
    gm = _graph_module(model)
    nodes = batch_norm_nodes(gm)
    if _is_training(gm) and nodes:
        bn_frozen = _all_or_none([not n.args[5] for n in nodes], "BatchNorm freeze")
    else:
        bn_frozen = bool(getattr(gm, _BN_FROZEN_ATTR, False))
    return QatPhase(fake_quant_on=fake_quant_on, observers_frozen=frozen, bn_frozen=bn_frozen)
