"""Ceil-mode int8 max pooling, rewritten so Inductor's int8 lowering computes it exactly.

torch 2.14's Inductor lowers `dequantize -> max_pool2d -> quantize` to `quantized.max_pool2d`
(torch/_inductor/fx_passes/quantization.py, `_register_quantization_maxpool2d`). The pattern
for the low-memory pool `prims._low_memory_max_pool_with_offsets(x, kernel_size, stride,
padding, dilation, ceil_mode)`, the form the pool reaches the pattern pass in, appends a
`KeywordArg("offset_dtype")` after the pool arguments: the prim's sixth argument, `ceil_mode`, is
bound to `offset_dtype`, and `qmaxpool2d` reads `kwargs.get("ceil_mode", False)`. Every int8
ceil-mode pool is compiled in floor mode: squeezenet1_0 at 32x32 fails ("Output size is too
small"), and at sizes where the floor size is still positive the compiled model silently
computes other numbers than the eager one.

The rewrite: pad the integer tensor on the right/bottom with its `quant_min` just enough that
floor mode gives ceil mode's output size, then pool in floor mode. `quant_min` dequantizes to the
smallest value the tensor can hold, so the maximum over any window holding at least one real
element is unchanged (checked per window; a pool that fails the check is left alone with a
warning). The padded values are bitwise those of the ceil-mode pool.

It can go when Inductor's int8 max-pool pattern binds `ceil_mode` to the pool's own argument.
"""

from __future__ import annotations

import operator
import warnings

import torch

_aten = torch.ops.aten
_MAX_POOLS = (_aten.max_pool2d.default, _aten.max_pool2d_with_indices.default)
_DEQUANTIZE = (
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
)
_QUANTIZE = (
    torch.ops.quantized_decomposed.quantize_per_tensor.default,
    torch.ops.quantized_decomposed.quantize_per_tensor.tensor,
)
_INT8_TYPES = (torch.int8, torch.uint8)
_DQ_QUANT_MIN, _DQ_DTYPE = 3, 5  # dequantize_per_tensor argument positions


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    values = [value] if isinstance(value, int) else list(value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _pool_args(pool: torch.fx.Node) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation) of a max-pool node, defaults filled in."""
    names = ("kernel_size", "stride", "padding", "dilation")
    defaults = (None, [], 0, 1)
    values = [
        pool.args[i] if i + 1 < len(pool.args) else pool.kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults), start=1)
    ]
    if not values[1]:  # an empty stride means stride = kernel size
        values[1] = values[0]
    return tuple(_pair(v) for v in values)


def _ceil_mode(pool: torch.fx.Node) -> bool:
    return bool(pool.args[5] if len(pool.args) > 5 else pool.kwargs.get("ceil_mode", False))


def ceil_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """ATen's ceil-mode pooling output size (`pooling_output_shape`): the last window must
    start inside the input or its left padding."""
    span = dilation * (kernel - 1) + 1
    out = -(-(size + 2 * pad - span) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _extra_padding(
    size: int, kernel: int, stride: int, pad: int, dilation: int
) -> tuple[int, bool]:
    """(right padding giving floor mode ceil mode's output size, whether every window of the
    padded floor-mode pool still holds a real element)."""
    out = ceil_output_size(size, kernel, stride, pad, dilation)
    span = dilation * (kernel - 1) + 1
    extra = max(0, (out - 1) * stride + span - 2 * pad - size)
    every_window_real = all(
        any(0 <= o * stride - pad + j * dilation < size for j in range(kernel)) for o in range(out)
    )
    return extra, every_window_real


def _spatial_size(node: torch.fx.Node) -> tuple[int, int] | None:
    """Static (H, W) of `node`, read through quantize/dequantize nodes (convert_pt2e leaves
    them without shape metadata; they keep their input's shape)."""
    while "val" not in node.meta and node.target in _DEQUANTIZE + _QUANTIZE:
        node = node.args[0]
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return None
    height, width = value.shape[-2:]
    if not (isinstance(height, int) and isinstance(width, int)):
        return None
    return height, width


def _indices_used(pool: torch.fx.Node) -> bool:
    if pool.target != _aten.max_pool2d_with_indices.default:
        return False
    return any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in pool.users)


def _pad_before_dequantize(
    gm: torch.fx.GraphModule, pool: torch.fx.Node, extra_h: int, extra_w: int
) -> None:
    """Pool a `quant_min`-padded copy of the integer tensor, in floor mode; other users of
    the dequantized tensor keep the unpadded one."""
    dequantize = pool.args[0]
    graph = gm.graph
    with graph.inserting_before(pool):
        padded = graph.call_function(
            _aten.constant_pad_nd.default,
            (dequantize.args[0], [0, extra_w, 0, extra_h], dequantize.args[_DQ_QUANT_MIN]),
        )
        pool_input = graph.call_function(
            dequantize.target, (padded, *dequantize.args[1:]), dict(dequantize.kwargs)
        )
    kernel, stride, padding, dilation = (list(v) for v in _pool_args(pool))
    pool.args = (pool_input, kernel, stride, padding, dilation, False)
    pool.kwargs = {}
    if not dequantize.users:
        graph.erase_node(dequantize)


def rewrite_ceil_mode_int8_max_pools(gm: torch.fx.GraphModule) -> int:
    """Rewrite, in place, every ceil-mode max pool of an int8 tensor (a dequantize_per_tensor
    input) whose ceil output size differs from floor mode's: padded integer input, floor mode,
    bitwise the same values. Returns how many pools were rewritten (0: graph untouched)."""
    rewritten = 0
    for pool in list(gm.graph.nodes):
        if pool.op != "call_function" or pool.target not in _MAX_POOLS or not _ceil_mode(pool):
            continue
        dequantize = pool.args[0]
        if not (
            isinstance(dequantize, torch.fx.Node)
            and dequantize.target in _DEQUANTIZE
            and dequantize.args[_DQ_DTYPE] in _INT8_TYPES
        ):
            continue  # a float pool: Inductor's own max-pool lowering handles ceil mode
        size = _spatial_size(dequantize)
        if size is None:
            raise ValueError(
                f"ceil-mode int8 max pool {pool.name!r}: its input has no static height and "
                "width, so the padding that keeps ceil mode through Inductor's int8 lowering "
                "cannot be computed"
            )
        kernel, stride, padding, dilation = _pool_args(pool)
        plans = [
            _extra_padding(size[i], kernel[i], stride[i], padding[i], dilation[i]) for i in (0, 1)
        ]
        (extra_h, real_h), (extra_w, real_w) = plans
        if extra_h == 0 and extra_w == 0:
            continue  # floor mode already gives ceil mode's size
        if _indices_used(pool) or not (real_h and real_w):
            # Padded indices would count the padded width; a window with only padding (possible
            # with dilation) would return quant_min instead of -inf.
            warnings.warn(
                f"ceil-mode int8 max pool {pool.name!r} left as is: Inductor's int8 lowering "
                "computes it in floor mode",
                stacklevel=2,
            )
            continue
        _pad_before_dequantize(gm, pool, extra_h, extra_w)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
