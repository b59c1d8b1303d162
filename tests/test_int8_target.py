"""quant.target: the weight range each target quantizes to, through QAT (the C++ fake quants
included), PTQ, conversion and the saved artifact; the warning of an artifact run on a weaker
CPU; the final check that compiled int8 agrees with the converted reference."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_topology import fake_cpuinfo
from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
from torchao.quantization.pt2e.observer import MovingAveragePerChannelMinMaxObserver

from qatdist.config import ConfigError, QuantConfig, load
from qatdist.finish.artifacts import export_int8
from qatdist.finish.checks import (
    INT8_REL_OUTPUT_DIFF_BOUND,
    Int8Disagreement,
    check_int8_agreement,
)
from qatdist.quant import QatModel, QatPhase, load_int8
from qatdist.quant import target as quant_target
from qatdist.quant.kernels.fast_fake_quant import use_fast_fake_quant
from qatdist.quant.ptq import prepare_ptq
from qatdist.topology import cpu_int8_capabilities

ROOT = Path(__file__).resolve().parent.parent

AVX2_CPU = {"cpu_model": "Old EPYC", "int8_dot_product": False}
VNNI_CPU = {"cpu_model": "New Xeon", "int8_dot_product": True}


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _trained(target: str) -> QatModel:
    torch.manual_seed(0)
    qat = QatModel.from_fp32(_Net(), QuantConfig(target=target), image_size=16)
    qat.set_phase(QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for step in range(2):
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(qat.prepared(images), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat


def _ranges(model: torch.nn.Module) -> set[tuple[int, int]]:
    """The quant ranges of a prepared model's fake quants and observers."""
    return {(m.quant_min, m.quant_max) for m in model.modules() if hasattr(m, "quant_max")}


def test_targets_resolve_and_the_config_refuses_others():
    assert quant_target.cpu_target(AVX2_CPU) == "avx2"
    assert quant_target.cpu_target(VNNI_CPU) == "vnni"
    assert quant_target.resolve("auto") == quant_target.cpu_target()
    assert quant_target.resolve("vnni") == "vnni"
    assert quant_target.weakest(["vnni", "avx2", "vnni"]) == "avx2"
    assert load(overrides={"quant": {"target": "avx2"}}).quant.target == "avx2"
    with pytest.raises(ConfigError, match="quant.target: expected 'auto' or 'vnni' or 'avx2'"):
        load(overrides={"quant": {"target": "avx512"}})


@pytest.mark.parametrize("target, weights", [("avx2", (-64, 63)), ("vnni", (-128, 127))])
def test_qat_ptq_and_conversion_quantize_weights_to_the_targets_range(target, weights):
    qat = _trained(target)
    # weights in the target's range, activations in the full 0..255
    assert _ranges(qat.prepared) == {weights, (0, 255)}
    int8 = qat.to_int8()
    assert quant_target.target_of(int8.graph) == target
    int8_weights = [t for t in int8.state_dict().values() if t.dtype == torch.int8]
    assert int8_weights and all(
        weights[0] <= int(t.min()) and int(t.max()) <= weights[1] for t in int8_weights
    )
    assert any(int(t.min()) == weights[0] or int(t.max()) == weights[1] for t in int8_weights)
    ptq = prepare_ptq(qat.fp32_model, qat.fp32_model.state_dict(), qat.quant_cfg, image_size=16)
    assert _ranges(ptq) == {weights, (0, 255)}


def test_fast_fake_quant_honours_the_7_bit_weight_range_bitwise():
    """qatdist's C++ op takes quant_min/quant_max from the module: -64..63 gives torchao's
    result, bit for bit, and values on that grid."""
    reference = FusedMovingAvgObsFakeQuantize(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-64,
        quant_max=63,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    fast = copy.deepcopy(reference)
    assert use_fast_fake_quant(fast) == 1
    weight = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    expected, got = reference(weight), fast(weight)
    assert torch.equal(got, expected)
    steps = got / fast.scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)  # on the grid
    assert int(steps.min()) == -64 or int(steps.max()) == 63
    assert -64 <= int(steps.min()) and int(steps.max()) <= 63


def test_saved_artifact_holds_its_target_and_a_weaker_cpu_warns_once(tmp_path, monkeypatch):
    example = torch.randn(2, 3, 16, 16)
    paths = {}
    for target in ("vnni", "avx2"):
        paths[target] = tmp_path / f"{target}.pt2"
        export_int8(_trained(target).to_int8(), example, paths[target])
    extra = {quant_target.METADATA_FILE: ""}
    torch.export.load(str(paths["avx2"]), extra_files=extra)
    assert quant_target.saved_target(extra) == "avx2"

    monkeypatch.setattr(quant_target, "cpu_int8_capabilities", lambda: AVX2_CPU)
    monkeypatch.setattr(quant_target, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_int8(paths["avx2"])  # this CPU computes an avx2 artifact exactly: no warning
    with pytest.warns(quant_target.Int8TargetWarning, match="'vnni' runs on Old EPYC"):
        program = load_int8(paths["vnni"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_int8(paths["vnni"])  # once per process
    assert program.module()(example).shape == (2, 4)
    assert quant_target.weaker_cpu_message("vnni", VNNI_CPU) is None
    assert quant_target.weaker_cpu_message("avx2", VNNI_CPU) is None


def test_int8_disagreement_beyond_rounding_fails_naming_target_and_cpu():
    scale = 20.0
    within = {
        "int8_compiled_output_scale": scale,
        "int8_compiled_max_abs_logit_diff": INT8_REL_OUTPUT_DIFF_BOUND * scale,
        "int8_aoti_output_scale": scale,
        "int8_target": "vnni",
    }
    check_int8_agreement(within, AVX2_CPU)  # at the bound: rounding
    beyond = within | {"int8_aoti_max_abs_logit_diff": 5.6}
    with pytest.raises(
        Int8Disagreement, match=r"aoti int8 outputs .*\(28\.0% .*'vnni' runs on Old"
    ):
        check_int8_agreement(beyond, AVX2_CPU)
    with pytest.raises(Int8Disagreement) as caught:
        check_int8_agreement(beyond | {"int8_target": "avx2"}, VNNI_CPU)
    assert "runs on" not in str(caught.value)  # not the CPU's fault: no such cause named


# One 1x1 convolution over 64 channels whose inputs and weights reach the ends of their ranges:
# with 8-bit weights a pair of u8 x s8 products (255 x 127 twice) overflows int16.
_SATURATION_PROBE = textwrap.dedent("""
    import copy, json, torch
    from qatdist.config import QuantConfig
    from qatdist.quant import QatModel, QatPhase, capture, compile_for_inference, prepare_qat
    from qatdist.quant import target as quant_target

    out = {"resolved": quant_target.resolve("auto")}
    for target in ("vnni", "auto"):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(64, 4, 1, bias=False)
        with torch.no_grad():
            net.weight.fill_(1.0)
            net.weight[1].fill_(-1.0)
        x = torch.rand(2, 64, 4, 4)
        x[0] = 1.0
        cfg = QuantConfig(target=target)
        qat = QatModel(net, prepare_qat(capture(copy.deepcopy(net), x), cfg), cfg)
        qat.set_phase(QatPhase(fake_quant_on=True, observers_frozen=False, bn_frozen=False))
        qat.prepared(x)
        int8 = qat.to_int8()
        with torch.no_grad():
            reference = int8(x)
            compiled = compile_for_inference(int8)(x)
        out[target] = float((compiled - reference).abs().max() / reference.abs().max())
    print(json.dumps(out))
""")


@pytest.mark.int8_numeric
@pytest.mark.slow
def test_without_int8_dot_products_only_the_avx2_target_is_exact():
    """oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA, which any x86-64 CPU can run): 8-bit weights
    ('vnni') saturate its int16 pair sums, the compiled model far from the converted one;
    'auto' resolves to 'avx2' there, and compiled matches converted to float rounding."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _SATURATION_PROBE],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["resolved"] == "avx2"
    assert measured["vnni"] > 0.25  # measured 0.49: every pair clipped to 32767
    assert measured["auto"] < 1e-4


def test_a_onednn_isa_cap_below_vnni_means_no_int8_dot_products(tmp_path, monkeypatch):
    cpuinfo = fake_cpuinfo(tmp_path / "cpuinfo", ["avx2 avx512f avx512_vnni"] * 2)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap, dot_product in (("", True), ("AVX512_CORE_VNNI", True), ("avx2", False)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        caps = cpu_int8_capabilities(cpuinfo)
        assert caps["int8_dot_product"] is dot_product, cap
        assert caps["onednn_max_cpu_isa"] == (cap.upper() or None)
    assert quant_target.cpu_target(caps) == "avx2"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in quant_target.weaker_cpu_message("vnni", caps)
