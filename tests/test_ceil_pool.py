"""Ceil-mode int8 max pooling through Inductor: the rewrite in qatdist.quant.fixes.ceil_pool is
exact (bitwise, eager) and the compiled model keeps ceil mode's shapes and the int8 max-pool
kernel."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

import qatdist.quant.convert as convert
from qatdist.config import QuantConfig
from qatdist.quant import QatModel
from qatdist.quant.fixes.ceil_pool import ceil_output_size, rewrite_ceil_mode_int8_max_pools
from qatdist.quant.inspect import annotated_layers, count_quantized_ops

IMAGE_SIZE = 12  # pool sizes 12 -> 6 (floor: 5), 6 -> 4 (floor: 3), 2 -> 1 (floor: 0)
_INT8_MAX_POOL = "torch.ops.quantized.max_pool2d"
_quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
_dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default


class CeilPoolNet(nn.Module):
    """Three ceil-mode pools whose ceil size differs from floor's: after a conv without ReLU
    (nonzero zero point), with padding=1, and one whose window is larger than its input."""

    def __init__(self, ceil_mode: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=ceil_mode)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(3, 2, padding=1, ceil_mode=ceil_mode)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(3, 2, ceil_mode=ceil_mode)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.pool3(self.relu3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _images(seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _trained(ceil_mode: bool = True, size: int = IMAGE_SIZE) -> QatModel:
    """A QatModel after two SGD steps (observer ranges and weights moved)."""
    torch.manual_seed(0)
    qat = QatModel.from_fp32(CeilPoolNet(ceil_mode), QuantConfig(), image_size=size)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for step in range(2):
        loss = F.cross_entropy(qat.prepared(_images(step, size)), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat


def _unrewritten_int8(qat: QatModel) -> torch.fx.GraphModule:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "rewrite_ceil_mode_int8_max_pools", lambda gm: 0)
        return qat.to_int8()


def _ceil_pools(gm: torch.fx.GraphModule) -> int:
    pools = [n for n in gm.graph.nodes if n.target == torch.ops.aten.max_pool2d.default]
    return sum(1 for n in pools if len(n.args) > 5 and n.args[5])


def _floor_pools(gm: torch.fx.GraphModule) -> int:
    pools = [n for n in gm.graph.nodes if n.target == torch.ops.aten.max_pool2d.default]
    return sum(1 for n in pools if len(n.args) < 6 or not n.args[5])


@pytest.fixture(scope="module")
def ceil_qat() -> QatModel:
    return _trained()


@pytest.mark.int8_numeric
def test_rewrite_is_bitwise_exact_and_compiles_to_int8_max_pool(ceil_qat):
    reference = _unrewritten_int8(ceil_qat)
    assert _ceil_pools(reference) == 3
    rewritten = copy.deepcopy(reference)
    assert rewrite_ceil_mode_int8_max_pools(rewritten) == 3
    assert _ceil_pools(rewritten) == 0
    int8 = ceil_qat.to_int8()  # the rewrite is part of qatdist's conversion
    assert _ceil_pools(int8) == 0

    images = _images(7)
    with torch.no_grad():
        expected = reference(images)
        assert torch.equal(rewritten(images), expected)
        assert torch.equal(int8(images), expected)
        compiled, codes = run_and_get_code(convert.compile_for_inference(int8), images)
    code = "\n".join(codes)
    assert compiled.shape == expected.shape == (4, 4)
    # int8 max pool is exact; the quantized convs round differently by CPU vendor, and their
    # sums are exact on this CPU with the default target (qatdist.quant.target).
    assert (compiled - expected).abs().max() <= 0.05 * expected.abs().max()
    assert code.count(_INT8_MAX_POOL) == 3
    annotated = annotated_layers(ceil_qat.prepared)
    assert count_quantized_ops(code) == {"conv": 3, "linear": 1}
    assert count_quantized_ops(code) == {k: len(v) for k, v in annotated.items()}


def test_without_rewrite_inductor_pools_in_floor_mode(ceil_qat):
    """The upstream bug the rewrite works around: if this starts to pass, Inductor honours
    ceil_mode again and the rewrite can go."""
    reference = _unrewritten_int8(ceil_qat)
    with torch.no_grad(), pytest.raises(Exception, match="Output size is too small"):
        convert.compile_for_inference(reference)(_images(7))


def test_floor_mode_graph_is_left_unchanged():
    qat = _trained(ceil_mode=False, size=24)  # at 12 floor mode's last pool has no output
    int8 = _unrewritten_int8(qat)
    assert _floor_pools(int8) == 3
    code = int8.code
    assert rewrite_ceil_mode_int8_max_pools(int8) == 0
    assert int8.code == code


def _traced_int8_pool(size, kernel, stride, pad, dilation, share_dequantize=False):
    """make_fx graph of quantize -> dequantize -> max_pool2d(ceil_mode=True): the aten form
    (max_pool2d_with_indices + getitem) with shape metadata on every node."""
    qparams = (0.05, 100, 0, 255, torch.uint8)

    def pool(x):
        dq = _dequantize(_quantize(x, *qparams), *qparams)
        out = F.max_pool2d(dq, kernel, stride, pad, dilation, ceil_mode=True)
        return (out, dq.sum()) if share_dequantize else out

    return make_fx(pool)(torch.randn(2, 3, size, size + 1))


def test_rewrite_matches_ceil_mode_on_every_small_pool_shape():
    checked = 0
    for size, kernel, stride, dilation in itertools.product(
        range(1, 9), (1, 2, 3), (1, 2, 3), (1, 2)
    ):
        for pad in range(kernel // 2 + 1):
            if ceil_output_size(size, kernel, stride, pad, dilation) < 1:
                continue
            x = torch.randn(2, 3, size, size + 1) * 4  # saturates: quant_min values occur
            expected = F.max_pool2d(x, kernel, stride, pad, dilation, ceil_mode=True)
            assert expected.shape[-2] == ceil_output_size(size, kernel, stride, pad, dilation)
            gm = _traced_int8_pool(size, kernel, stride, pad, dilation)
            reference = gm(x)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                count = rewrite_ceil_mode_int8_max_pools(gm)
            assert torch.equal(gm(x), reference), (size, kernel, stride, pad, dilation)
            assert count + len(caught) <= 1
            assert not caught or dilation > 1  # only dilation can leave a window all padding
            if count:
                checked += 1
                ceil_pools = [n for n in gm.graph.nodes if "max_pool" in str(n.target)]
                assert [n.args[5] for n in ceil_pools] == [False]
    assert checked > 50


def test_shared_dequantize_keeps_its_other_users_unpadded():
    gm = _traced_int8_pool(6, 3, 2, 0, 1, share_dequantize=True)
    x = torch.randn(2, 3, 6, 7)
    pooled, total = gm(x)
    assert rewrite_ceil_mode_int8_max_pools(gm) == 1
    new_pooled, new_total = gm(x)
    assert torch.equal(new_pooled, pooled) and torch.equal(new_total, total)
    dequantizes = [n for n in gm.graph.nodes if n.target == _dequantize]
    assert len(dequantizes) == 2
