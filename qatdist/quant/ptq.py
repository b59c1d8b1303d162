"""Post-training quantization (PTQ): the int8 model a user would have had without QAT.

The baseline QAT is judged against: the float weights at the moment fake quantization turns on,
captured in eval mode, annotated by the same `X86InductorQuantizer` (same layers kept in fp32)
with its static post-training config, calibrated on a few train batches, converted.

One change from the quantizer's default PTQ config: activations are observed with
`MinMaxObserver` instead of `HistogramObserver`, because min/max statistics can be synced
across ranks exactly (min of mins, max of maxes, `quant.sync`) while histograms cannot; each
rank calibrates on its share of the batches and the synced result is what one process would
have seen on all of them. Weights keep the default per-channel min/max observer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torchao.quantization.pt2e.observer import MinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    get_default_x86_inductor_quantization_config,
)

from qatdist.config import QuantConfig
from qatdist.quant.capture import capture
from qatdist.quant.prepare import build_quantizer
from qatdist.quant.schedule import to_eval
from qatdist.quant.sync import sync_quant_stats


def ptq_quantization_config():
    """The x86 static PTQ config with min/max activation observers (syncable across ranks)."""
    default = get_default_x86_inductor_quantization_config(is_qat=False)
    activation = dataclasses.replace(
        default.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12)
    )
    return dataclasses.replace(default, input_activation=activation, output_activation=activation)


def float_weights(prepared_state: dict[str, torch.Tensor], fp32_model: torch.nn.Module) -> dict:
    """The entries of a prepared QAT model's state dict that the eager fp32 model has: the
    prepared graph keeps the original parameter and buffer names, plus observer buffers. A
    graph captured in eval mode (`training_only`) has no BatchNorm `num_batches_tracked`
    counters; the eager model's own are kept (eval never reads them)."""
    wanted = fp32_model.state_dict()
    counters = {k for k in wanted if k.endswith("num_batches_tracked") and k not in prepared_state}
    missing = sorted(set(wanted) - set(prepared_state) - counters)
    if missing:
        raise KeyError(f"prepared state lacks fp32 entries: {', '.join(missing[:5])}")
    return {k: (wanted if k in counters else prepared_state)[k].detach().clone() for k in wanted}


def prepare_ptq(
    fp32_model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    quant_cfg: QuantConfig,
    *,
    image_size: int,
    dynamic_spatial: bool = False,
) -> torch.fx.GraphModule:
    """A copy of `fp32_model` with `weights`, captured in eval mode (height and width dynamic
    with `dynamic_spatial`) and prepared with the PTQ
    config (observers, no fake quantization; layers of `quant_cfg.fp32_module_names/types`
    kept fp32, as in QAT). `fp32_model` itself is not changed."""
    model = copy.deepcopy(fp32_model)
    model.load_state_dict(weights)
    model.eval()
    quantizer = build_quantizer(quant_cfg, ptq_quantization_config())
    example = torch.zeros(2, 3, image_size, image_size)
    return prepare_pt2e(capture(model, example, dynamic_spatial=dynamic_spatial), quantizer)


def post_training_int8(
    fp32_model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    calibration: Iterable[torch.Tensor],
    quant_cfg: QuantConfig,
    *,
    image_size: int,
    dynamic_spatial: bool = False,
    group=None,
) -> torch.fx.GraphModule:
    """PTQ of `fp32_model`'s architecture with `weights` (`prepare_ptq`): run `calibration`
    (this rank's image batches), sync observer statistics across `group`'s ranks (a collective:
    every rank calls, whatever its number of batches), convert. Returns the int8 model in eval
    mode."""
    prepared = prepare_ptq(
        fp32_model, weights, quant_cfg, image_size=image_size, dynamic_spatial=dynamic_spatial
    )
    with torch.no_grad():
        for images in calibration:
            prepared(images)
    sync_quant_stats(prepared, group)
    converted = convert_pt2e(prepared)
    to_eval(converted)
    return converted
