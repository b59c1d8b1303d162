"""X86InductorQuantizer set-up (QAT config, per-layer fp32 exclusions) and prepare_qat_pt2e."""

from __future__ import annotations

import importlib
import re
import warnings

import torch
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from qatdist.config import ConfigError, QuantConfig
from qatdist.quant import target as quant_target
from qatdist.quant.fixes.attention import attribute_functional_linears
from qatdist.quant.fixes.batchnorm import bn_literals, restore_bn_literals
from qatdist.quant.fixes.constant_layers import drop_constant_annotations
from qatdist.quant.fixes.conv_bn_patterns import only_present_conv_types
from qatdist.quant.fixes.fast_annotate import fast_sequential_partitions
from qatdist.quant.fixes.functional_activations import attribute_functional_activations
from qatdist.quant.kernels.fast_fake_quant import use_fast_fake_quant
from qatdist.quant.kernels.weight_scaling import defer_weight_scaling


def _resolve_type(dotted: str) -> type:
    module_name, _, attr = dotted.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"quant.fp32_module_types: cannot import {dotted!r}") from None
    if resolved not in X86InductorQuantizer.module_function_to_aten_operator_type:
        supported = sorted(
            f"{t.__module__}.{t.__name__}"
            for t in X86InductorQuantizer.module_function_to_aten_operator_type
            if isinstance(t, type)
        )
        raise ConfigError(
            f"quant.fp32_module_types: {dotted!r} is not supported by X86InductorQuantizer; "
            f"supported: {', '.join(supported)}"
        )
    return resolved


class _QatX86InductorQuantizer(X86InductorQuantizer):
    """X86InductorQuantizer whose "skip" annotations do not break QAT conv-BN fusion.

    A module excluded with a `None` config gets an annotation with an empty input map;
    `prepare_qat_pt2e`'s conv-BN rewrite then indexes that empty map and fails with IndexError
    (torchao 0.18). Dropping those empty annotations leaves the nodes unannotated, which means
    the same thing: no observers, the layer runs in fp32.

    Annotation uses the fast sequential-partition search (same result, see `fast_annotate`);
    linears called as functions on parameters (attention projections) are annotated like any
    nn.Linear (see `attention`); activations called as functions (`F.relu`) fuse with their
    convolution like ReLU modules (see `functional_activations`); computations that read only
    parameters and buffers (swin_v2's position-bias MLP) are left unannotated: freezing folds
    them to constants (see `constant_layers`).
    """

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        attribute_functional_linears(model)
        attribute_functional_activations(model)
        return super().transform_for_annotation(model)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        with fast_sequential_partitions():
            model = super().annotate(model)
        for node in model.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if (
                annotation is not None
                and not annotation.input_qspec_map
                and annotation.output_qspec is None
            ):
                del node.meta["quantization_annotation"]
        drop_constant_annotations(model)
        return model


# X86InductorQuantizer's setters answer a config they cannot apply with a UserWarning and keep
# the previous one (a QAT quantizer given a PTQ global config stays QAT). In qatdist that is
# always a bug, so `build_quantizer` turns these warnings into errors; pyproject.toml's pytest
# filters make them errors in the tests wherever else they come from.
REFUSED_CONFIG_WARNINGS = (
    "Mixed QAT and Non-QAT quantization config",
    "Mixed dynamic and static quantization config",
    "Skip the global quantization config",
    "Skip the quantization config for",
    "The global_config for X86InductorQuantizer is currently invalid",
    "function: Unable to customize quantization config",
    "Module: Unable to customize quantization config",
    "operator: Unable to quantize",
)


def build_quantizer(
    cfg: QuantConfig, global_config: QuantizationConfig | None = None
) -> X86InductorQuantizer:
    """A new x86 Inductor quantizer with `global_config` (default: the QAT config), its weight
    range that of `cfg.target` (`qatdist.quant.target`), for every layer but those `cfg` keeps
    in fp32.

    One quantizer holds one kind of config: `X86InductorQuantizer` refuses to mix QAT and
    post-training configs, so each mode builds its own quantizer."""
    quantizer = _QatX86InductorQuantizer()
    with warnings.catch_warnings():
        for message in REFUSED_CONFIG_WARNINGS:
            warnings.filterwarnings("error", message=re.escape(message), category=UserWarning)
        default = get_default_x86_inductor_quantization_config(is_qat=True)
        quantizer.set_global(quant_target.for_target(global_config or default, cfg.target))
        for name in cfg.fp32_module_names:
            quantizer.set_module_name_qconfig(name, None)
        for dotted in cfg.fp32_module_types:
            quantizer.set_module_type_qconfig(_resolve_type(dotted), None)
    return quantizer


def prepare_qat(graph_module: torch.fx.GraphModule, cfg: QuantConfig) -> torch.fx.GraphModule:
    """Insert fake-quant/observer modules for QAT into a captured graph module (with
    vectorized kernels when `cfg.fast_fake_quant`, the conv-BN weight scaling inside them when
    `cfg.fused_weight_scaling` too); BatchNorm keeps the model's eps/momentum."""
    model_bn = bn_literals(graph_module)
    with only_present_conv_types():
        prepared = prepare_qat_pt2e(graph_module, build_quantizer(cfg))
    restore_bn_literals(prepared, model_bn)  # the conv-BN rewrite reset them to 1e-5/0.1
    if cfg.fast_fake_quant:
        use_fast_fake_quant(prepared)
        if cfg.fused_weight_scaling:
            defer_weight_scaling(prepared)
    return prepared
