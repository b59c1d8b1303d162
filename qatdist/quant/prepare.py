"""X86InductorQuantizer set-up (QAT config, per-layer fp32 exclusions) and prepare_qat_pt2e."""

from __future__ import annotations

import importlib

import torch
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from qatdist.config import ConfigError, QuantConfig


def _resolve_type(dotted: str) -> type:
    module_name, _, attr = dotted.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"quant.fp32_module_types: cannot import {dotted!r}") from None
    if not (isinstance(resolved, type) and issubclass(resolved, torch.nn.Module)):
        raise ConfigError(f"quant.fp32_module_types: {dotted!r} is not an nn.Module type")
    return resolved


def build_quantizer(cfg: QuantConfig) -> X86InductorQuantizer:
    """The x86 Inductor quantizer with the QAT config globally; listed modules stay fp32."""
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    for name in cfg.fp32_module_names:
        quantizer.set_module_name_qconfig(name, None)
    for dotted in cfg.fp32_module_types:
        quantizer.set_module_type_qconfig(_resolve_type(dotted), None)
    return quantizer


def prepare_qat(graph_module: torch.fx.GraphModule, cfg: QuantConfig) -> torch.fx.GraphModule:
    """Insert fake-quant/observer modules for QAT into a captured graph module."""
    return prepare_qat_pt2e(graph_module, build_quantizer(cfg))
