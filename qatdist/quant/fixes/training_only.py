"""Training-only branches: the eval graph must compute what the eager model computes in `eval()`.

`torch.export` traces the branch a Python `if self.training:` takes at capture, and qatdist
captures in train mode. `schedule.to_eval` switches off what it recognises in the graph
(dropout's `train` flag, torchvision's stochastic-depth mask), but any other training-only code
(efficientnet_pytorch's `drop_connect(x, p, training=self.training)`: `rand` + `floor` + `div`
+ `mul`) would stay in the graph used for evaluation, the baselines and the int8 model: a
random "eval" and a random deployed model.

The general fix (`capture_for_qat`): when the train-mode capture holds random ops that `to_eval`
would leave running, the model is captured in eval mode instead, where every such branch is
absent, and the graph is switched to train mode by torchao's rewrite (BatchNorm batch
statistics, dropout on). Evaluation and the int8 model then compute exactly the eager eval
model; training runs without those branches, which the log and the report
(`training_only_ops`) say. Capturing in eval mode and carrying the trained state into a second
graph by name was tried first and does not hold: the branch changes what the quantizer fuses
(efficientnet's `project` conv + residual add is one int8 conv-add in eval, but in train the
drop connect sits between them), so the two graphs quantize different ops. When the eval-mode
capture is random too, the model is refused before training, naming the op and the module.

It can go when torchao's train/eval switch removes (or torch.export records) training-only
branches beyond dropout and batch norm.
"""

from __future__ import annotations

import logging

import torch

from qatdist.config import ConfigError
from qatdist.quant.capture import capture
from qatdist.quant.schedule import QatPhase, eval_neutralized_nodes, to_train

log = logging.getLogger("qatdist")

# aten ops that draw random numbers (overload packet names; in-place variants end in "_").
RANDOM_OPS = frozenset(
    {
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "bernoulli",
        "normal",
        "uniform",
        "exponential",
        "geometric",
        "cauchy",
        "log_normal",
        "multinomial",
        "poisson",
        "rrelu",
        "rrelu_with_noise",
        "native_dropout",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "feature_alpha_dropout",
    }
)
# Dropout variants are random only with their `train` argument (the third) true.
_DROPOUTS = frozenset(
    {"native_dropout", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}
)
# A batch's worth of difference that float32 rounding of the same computation cannot explain.
EAGER_MATCH_RTOL = 1e-3


class TrainingOnlyBranchError(ConfigError):
    """A model whose eval graph would still compute a training-only (random) branch: a bad
    `model.name` for qatdist, found before training."""


def _op_name(node: torch.fx.Node) -> str | None:
    packet = getattr(node.target, "_overloadpacket", None)
    return None if packet is None else packet.__name__.rstrip("_")


def random_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of `gm` that draw random numbers as the graph stands (a dropout in eval mode
    does not), not counting those `schedule.to_eval` neutralises."""
    neutral = set(eval_neutralized_nodes(gm))
    found = []
    for node in gm.graph.nodes:
        name = _op_name(node) if node.op == "call_function" else None
        if name not in RANDOM_OPS or node in neutral:
            continue
        if name in _DROPOUTS and not (len(node.args) > 2 and node.args[2] is True):
            continue
        found.append(node)
    return found


def describe(node: torch.fx.Node) -> str:
    """`aten.rand in module 'blocks.0' (MBConvBlock)`: the op and the module it came from."""
    stack = node.meta.get("nn_module_stack") or {}
    op = f"aten.{_op_name(node)}"
    if not stack:
        return f"{op} (in the model's own forward)"
    path, module_type = list(stack.values())[-1]
    type_name = module_type if isinstance(module_type, str) else module_type.__qualname__
    return f"{op} in module {path!r} ({type_name.rpartition('.')[2]})"


def capture_for_qat(
    model: torch.nn.Module, example: torch.Tensor, *, dynamic_spatial: bool = False
) -> tuple[torch.fx.GraphModule, list[str]]:
    """The graph of `model` to prepare for QAT, in train mode, and the training-only random
    ops (`describe`d) it leaves out: none when the train-mode capture evaluates exactly once
    `to_eval` has run; otherwise the eval-mode capture switched to train mode (module doc).
    Raises TrainingOnlyBranchError when the model is random in eval mode too."""
    graph = capture(model.train(), example, dynamic_spatial=dynamic_spatial)
    leftover = random_nodes(graph)
    if not leftover:
        return graph, []
    dropped = sorted({describe(node) for node in leftover})
    graph = capture(model.eval(), example, dynamic_spatial=dynamic_spatial)
    if still := random_nodes(graph):
        raise TrainingOnlyBranchError(
            f"model.name: the model is random in eval mode: {describe(still[0])} (an int8 "
            "model must give the same output for the same input)"
        )
    to_train(graph, QatPhase(fake_quant_on=False, observers_frozen=False, bn_frozen=False))
    log.warning(
        "training-only random ops the eval graph must not run: %s; QAT trains the eval-mode "
        "capture (BatchNorm and dropout in train mode) without them",
        ", ".join(dropped),
    )
    return graph, dropped


def eager_mismatch(graph_out: torch.Tensor, eager_out: torch.Tensor) -> str | None:
    """None when the float eval graph's output matches the eager model's in eval mode within
    float32 rounding; otherwise the numbers, for an error message."""
    diff = (graph_out - eager_out).abs().max().item()
    scale = max(1.0, eager_out.abs().max().item())
    if diff <= EAGER_MATCH_RTOL * scale:
        return None
    return (
        f"max |difference| {diff:.4g} on outputs up to {scale:.4g} (allowed {EAGER_MATCH_RTOL:g}x)"
    )
