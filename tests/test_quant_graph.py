"""Graph-level quantization fixes: BatchNorm literals through QAT, the fast sequential-partition
search, and attention projections annotated like any linear."""

from __future__ import annotations

import contextlib
import copy
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch._inductor.utils import run_and_get_code
from torchao.quantization.pt2e.graph_utils import find_sequential_partitions
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)
from torchvision.models import swin_transformer

from qatdist.config import QuantConfig
from qatdist.finish.checks import coverage
from qatdist.models import tiny_vit
from qatdist.quant import schedule
from qatdist.quant.capture import capture
from qatdist.quant.convert import compile_for_inference, convert_to_int8
from qatdist.quant.fixes.attention import attribute_functional_linears
from qatdist.quant.fixes.fast_annotate import (
    fast_sequential_partitions,
    find_sequential_partitions_fast,
)
from qatdist.quant.inspect import annotated_layers, constant_layers, count_quantized_ops
from qatdist.quant.prepare import build_quantizer, prepare_qat
from qatdist.tasks.classification import agreement_where_decided

_BATCH_NORM = torch.ops.aten.batch_norm.default


def _bn_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """batch_norm nodes by the module path of their running-mean buffer."""
    return {
        n.args[3].target.removesuffix(".running_mean"): n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target == _BATCH_NORM
    }


def _assert_model_literals(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    nodes = _bn_nodes(gm)
    bns = {k: m for k, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(nodes) == set(bns)
    for name, node in nodes.items():
        assert (node.args[6], node.args[7]) == (bns[name].momentum, bns[name].eps), name


@pytest.fixture(scope="module")
def mobilenet_v3_small_qat():
    """mobilenet_v3_small (eps 1e-3, momentum 0.01) with small running variances, so that the
    eps a conv-BN fold uses changes the folded bias measurably; and its prepared graph."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(1e-4, 1e-3)
            module.running_mean.normal_()
    prepared = prepare_qat(capture(model, torch.randn(2, 3, 32, 32)), QuantConfig())
    return model, prepared


def test_bn_eps_momentum_survive_prepare_and_switches(mobilenet_v3_small_qat):
    model, prepared = mobilenet_v3_small_qat
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    _assert_model_literals(prepared, model)
    # the QAT weight scaling beside each BatchNorm uses the same eps
    for node in _bn_nodes(prepared).values():
        adds = [u for u in node.args[4].users if u.target == torch.ops.aten.add.Tensor]
        assert adds and all(a.args[1] == node.args[7] for a in adds)

    phase = schedule.QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False)
    schedule.to_eval(prepared)
    _assert_model_literals(prepared, model)
    schedule.to_train(prepared, phase)
    _assert_model_literals(prepared, model)
    prepared(torch.randn(4, 3, 32, 32))  # a training step's forward still runs


def _conv_bias_by_module(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    out = {}
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.conv2d.default and isinstance(node.args[2], torch.fx.Node):
            path = list(node.meta["nn_module_stack"].values())[-1][0]
            out[path] = _fetch(gm, node.args[2])
    return out


def _fetch(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def test_conv_bn_fold_uses_model_eps(mobilenet_v3_small_qat):
    model, prepared = mobilenet_v3_small_qat
    schedule.to_eval(prepared)
    converted = convert_to_int8(prepared)
    assert not _bn_nodes(converted)  # every BatchNorm of mobilenet_v3 follows a conv: folded
    biases = _conv_bias_by_module(converted)
    checked = 0
    for name, bn in model.named_modules():
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        conv_name = name.rpartition(".")[0] + ".0"
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        expected = bn.bias - bn.running_mean * scale  # mobilenet's convs have no bias
        default_eps = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + 1e-5)
        folded = biases[conv_name]
        torch.testing.assert_close(folded, expected.detach(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(folded, default_eps.detach(), rtol=1e-3, atol=1e-3)
        checked += 1
    assert checked == 34


def test_unfused_batchnorm_keeps_its_literals_in_the_converted_graph():
    """A BatchNorm that follows no conv is not folded: it stays in the int8 graph, as defined."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.03),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8, eps=2e-3, momentum=0.2),
        torch.nn.Conv2d(8, 4, 3),
    )
    prepared = prepare_qat(capture(model, torch.randn(2, 3, 16, 16)), QuantConfig())
    _assert_model_literals(prepared, model)
    prepared(torch.randn(4, 3, 16, 16))
    converted = convert_to_int8(prepared)
    remaining = _bn_nodes(converted)
    assert list(remaining) == ["3"]
    assert (remaining["3"].args[6], remaining["3"].args[7]) == (0.2, 2e-3)


def _spec_signature(spec):
    edge_or_node = getattr(spec, "edge_or_node", None)
    if edge_or_node is None:  # a QuantizationSpec (compared by value) or None
        return spec
    if isinstance(edge_or_node, tuple):  # SharedQuantizationSpec on an edge
        return ("shared", tuple(n.name for n in edge_or_node))
    return ("shared", edge_or_node.name)


def _annotations(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    """Every node's quantization annotation in comparable form (nodes by name)."""
    out = {}
    for node in gm.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if annotation is not None:
            out[node.name] = (
                tuple((n.name, _spec_signature(s)) for n, s in annotation.input_qspec_map.items()),
                _spec_signature(annotation.output_qspec),
                annotation.allow_implicit_sharing,
                annotation._annotated,
                annotation._is_output_of_quantized_pattern,
            )
    return out


_SMALL_MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "small_densenet": lambda: torchvision.models.DenseNet(
        growth_rate=8, block_config=(3, 3), num_init_features=16, num_classes=10
    ),
}


@pytest.mark.parametrize("is_qat", [True, False], ids=["qat", "ptq"])
@pytest.mark.parametrize("name", sorted(_SMALL_MODELS))
def test_fast_partition_search_annotates_like_torchao(name, is_qat):
    torch.manual_seed(0)
    graph = capture(_SMALL_MODELS[name](), torch.randn(2, 3, 32, 32))
    config = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    results = []
    for fast in (False, True):
        quantizer = X86InductorQuantizer()
        quantizer.set_global(config)
        quantizer.set_module_name_qconfig("features.1", None)  # a "keep fp32" filter too
        gm = copy.deepcopy(graph)
        with fast_sequential_partitions() if fast else contextlib.nullcontext():
            quantizer.annotate(gm)
        results.append(_annotations(gm))
    torchao_result, fast_result = results
    assert len(torchao_result) > 15  # the comparison covers real annotations
    assert fast_result == torchao_result


@pytest.mark.parametrize(
    "pattern",
    [
        [torch.nn.Conv2d, torch.nn.BatchNorm2d, operator.add, torch.nn.ReLU],
        [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU],
        [torch.nn.Conv2d, torch.nn.BatchNorm2d],
        [torch.nn.Conv2d],
    ],
)
def test_fast_partition_search_returns_torchao_list(pattern):
    graph = capture(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    expected = find_sequential_partitions(graph, pattern)
    assert expected  # resnet18 has every one of these chains
    assert find_sequential_partitions_fast(graph, pattern) == expected


def test_densenet121_prepares():
    """torchao's own search took over 9 minutes here; the fast one takes seconds."""
    graph = capture(torchvision.models.densenet121(num_classes=10), torch.randn(2, 3, 32, 32))
    prepared = prepare_qat(graph, QuantConfig())
    convs = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 120
    for conv in convs:  # every conv's weight goes through a fake quant
        weight = conv.args[1]
        assert weight.op == "call_module" and weight.target.startswith("activation_post_process")
    assert prepared(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_attention_projections_are_annotated_like_linears():
    graph = capture(tiny_vit(10), torch.randn(2, 3, 32, 32))
    annotated = build_quantizer(QuantConfig()).annotate(
        build_quantizer(QuantConfig()).transform_for_annotation(graph)
    )
    linears = [n for n in annotated.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 9  # per layer: attention in/out projections, two MLP linears; head
    for node in linears:
        annotation = node.meta.get("quantization_annotation")
        assert annotation is not None and node.args[1] in annotation.input_qspec_map, node.name
    paths = {list(n.meta["nn_module_stack"].values())[-1][0] for n in linears}
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in paths
    assert "encoder.layers.encoder_layer_1.self_attention.out_proj" in paths


def test_attention_kept_fp32_by_module_name_keeps_its_projections_fp32():
    graph = capture(tiny_vit(10), torch.randn(2, 3, 32, 32))
    keep = "encoder.layers.encoder_layer_0.self_attention"
    prepared = prepare_qat(graph, QuantConfig(fp32_module_names=[keep]))
    for node in prepared.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            in_attention = keep in [p for p, _ in node.meta["nn_module_stack"].values()]
            quantized_weight = node.args[1].op == "call_module"
            assert quantized_weight != in_attention, node.name


def _template_batch(templates: torch.Tensor, n: int, generator: torch.Generator):
    """Images of 10 classes that a tiny ViT separates in a few steps: a class's fixed random
    template plus noise."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    noise = torch.randn(n, *templates.shape[1:], generator=generator)
    return templates[labels] + 0.7 * noise, labels


@pytest.mark.slow
def test_vit_every_linear_runs_int8_and_compiled_agrees_with_converted():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 3, 32, 32, generator=generator)
    prepared = prepare_qat(capture(tiny_vit(10), torch.randn(2, 3, 32, 32)), QuantConfig())
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=3e-3)
    for _ in range(20):
        images, labels = _template_batch(templates, 32, generator)
        loss = torch.nn.functional.cross_entropy(prepared(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    schedule.to_eval(prepared)
    images, labels = _template_batch(templates, 64, generator)
    converted = convert_to_int8(prepared)
    with torch.no_grad():
        reference = converted(images)
        assert (reference.argmax(1) == labels).float().mean() >= 0.9  # far from chance
        # run_and_get_code resets Dynamo's caches first: it compiles afresh
        compiled, codes = run_and_get_code(compile_for_inference(converted), images)
    assert count_quantized_ops("\n".join(codes)) == {"conv": 1, "linear": 9}
    agreeing, comparable = agreement_where_decided(reference, compiled)
    assert comparable >= 32  # most samples are decided: the comparison means something
    assert agreeing == comparable


def _tiny_swin(v2: bool) -> torch.nn.Module:
    """Two one-block stages at 16x16; no stochastic depth, so the graph has no random masks."""
    torch.manual_seed(0)
    blocks = (
        {
            "block": swin_transformer.SwinTransformerBlockV2,
            "downsample_layer": swin_transformer.PatchMergingV2,
        }
        if v2
        else {}
    )
    return swin_transformer.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=10, stochastic_depth_prob=0.0, **blocks,
    )  # fmt: skip


def _linear_count(gm: torch.fx.GraphModule) -> int:
    return sum(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_functional_linears_are_annotated(v2):
    """`shifted_window_attention` calls F.linear with qkv/proj weights: now annotated too.
    swin_v2's position-bias MLP reads only a buffer and parameters: left fp32 (folded)."""
    graph = capture(_tiny_swin(v2), torch.randn(2, 3, 16, 16))
    linears = _linear_count(graph)
    assert linears == (14 if v2 else 10)  # per block qkv, proj, 2 mlp (+ 2 cpb_mlp); merge; head
    cpb = [f"features.{s}.0.attn.cpb_mlp.{i}" for s in (1, 3) for i in (0, 2)] if v2 else []
    assert constant_layers(graph) == {"conv": [], "linear": cpb}
    prepared = prepare_qat(graph, QuantConfig())
    annotated = annotated_layers(prepared)["linear"]
    assert len(annotated) == 10 and not set(annotated) & set(cpb)
    assert {"features.1.0.attn.qkv", "features.3.0.attn.proj"} <= set(annotated)
    assert constant_layers(prepared)["linear"] == cpb  # no fake quant feeds them


def test_swin_v2_computed_qkv_bias_split_keeps_the_output():
    """swin_v2 zeroes part of a cloned qkv bias; splitting it into an add keeps the numbers."""
    model = _tiny_swin(v2=True).eval()
    images = torch.randn(2, 3, 16, 16)
    graph = capture(model, images)
    assert attribute_functional_linears(graph) == 4  # qkv and proj of both blocks
    split = [n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert sum(len(n.args) == 2 and "attn.qkv" in n.args[1].target for n in split) == 2
    with torch.no_grad():
        torch.testing.assert_close(graph(images), model(images), rtol=1e-4, atol=1e-5)


def test_swin_attention_kept_fp32_by_module_name_keeps_its_projections_fp32():
    graph = capture(_tiny_swin(v2=False), torch.randn(2, 3, 16, 16))
    cfg = QuantConfig(fp32_module_names=["features.1.0.attn", "features.3.0.attn.qkv"])
    annotated = annotated_layers(prepare_qat(graph, cfg))["linear"]
    assert annotated == [
        "features.1.0.mlp.0", "features.1.0.mlp.3", "features.2.reduction",
        "features.3.0.attn.proj", "features.3.0.mlp.0", "features.3.0.mlp.3", "head",
    ]  # fmt: skip


class _TiedMixer(torch.nn.Module):
    """Calls F.linear on its own parameters, one of them twice in a row."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 8) * 0.3)
        self.gate = torch.nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x):
        hidden = torch.nn.functional.linear(x, self.weight).relu()
        mixed = torch.nn.functional.linear(hidden, self.weight)
        return mixed + torch.nn.functional.linear(x, self.gate)


class _FunctionalNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = _TiedMixer()
        self.head_weight = torch.nn.Parameter(torch.randn(4, 8) * 0.3)

    def forward(self, x):
        return torch.nn.functional.linear(self.mixer(x), self.head_weight)


def test_user_functional_linears_are_annotated_and_filtered_by_module_name():
    graph = capture(_FunctionalNet(), torch.randn(2, 8))
    annotated = annotated_layers(prepare_qat(graph, QuantConfig()))["linear"]
    # `mixer.weight` names its linears `mixer`; its second call gets the capture's `@1`
    assert annotated == ["mixer", "mixer@1", "mixer.gate", "head"]
    graph = capture(_FunctionalNet(), torch.randn(2, 8))
    kept = prepare_qat(graph, QuantConfig(fp32_module_names=["mixer"]))
    assert annotated_layers(kept)["linear"] == ["head"]


@pytest.mark.slow
def test_swin_v2_attention_linears_run_int8_and_its_bias_mlp_is_folded():
    """swin_v2 has everything swin has (qkv/proj called as F.linear) and more: a qkv bias
    computed in the graph and the position-bias MLP. One compile covers both."""
    prepared = prepare_qat(capture(_tiny_swin(True), torch.randn(2, 3, 16, 16)), QuantConfig())
    images = torch.randn(4, 3, 16, 16)
    prepared(images)  # observers see one batch
    schedule.to_eval(prepared)
    converted = convert_to_int8(prepared)
    with torch.no_grad():
        _, codes = run_and_get_code(compile_for_inference(converted), images)
    # swin_v2's cpb_mlp (4 linears) reads only a buffer and parameters: no int8 kernel for it
    counts = count_quantized_ops("\n".join(codes))
    assert counts == {"conv": 1, "linear": 10}
    fields = coverage(prepared, converted, {"inductor": counts})
    assert fields["quantization_complete"] is True and fields["unquantized_layers"] == []
    assert len(fields["constant_layers"]) == 4


class _FunctionalReluNet(torch.nn.Module):
    """conv-BN then `F.relu(inplace=True)` and a max pool, as torchvision's BasicConv2d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_functional_relus_fuse_with_their_conv_and_the_pool_runs_int8():
    """Without the re-attribution the ReLU is not in the conv-BN-ReLU fusion: the conv output is
    quantized before it and the max pool runs in float on the ReLU's output."""
    torch.manual_seed(0)
    prepared = prepare_qat(capture(_FunctionalReluNet(), torch.randn(2, 3, 12, 12)), QuantConfig())
    prepared(torch.randn(4, 3, 12, 12))
    converted = convert_to_int8(prepared)
    targets = {str(n.target): n for n in converted.graph.nodes}
    relus = [n for n in converted.graph.nodes if str(n.target).startswith("aten.relu")]
    assert len(relus) == 2
    for relu in relus:  # fused: conv -> relu -> quantize, no quantize between conv and relu
        assert relu.args[0].target == torch.ops.aten.conv2d.default
        assert all("quantize_per_tensor" in str(u.target) for u in relu.users)
    pool = targets["aten.max_pool2d.default"]
    assert "dequantize_per_tensor" in str(pool.args[0].target)  # an int8 max pool
