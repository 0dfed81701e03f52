"""Which implementation the CUDA kernels of the lowrank ops run.

`LOWRANK_CUDA_IMPL` selects it, read once (on the first CUDA call):

    triton  (default) the fused Triton kernels in lowrank_kernels/triton/
    cudnn   the unfused pair of F.conv2d calls (cuDNN on CUDA) for `lowrank::sep_conv` and its
            backward op: an escape hatch for a GPU on which a Triton kernel fails. The op, its
            fake kernel and its autograd stay the same; only the CUDA kernel changes.

The other op families (batched_svd, householder_product) always run Triton on CUDA.

Everything here is plain Python on plain tensors, so the tests run the selection and both
implementations on CPU tensors (Triton through its interpreter)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
from torch._prims_common import suggest_memory_format

from ._conv_args import _check_sep_conv
from ._reference import sep_conv_reference

ENV_VAR = "LOWRANK_CUDA_IMPL"
CHOICES = ("triton", "cudnn")
DEFAULT = "triton"


def parse_cuda_impl(value: str | None) -> str:
    """The implementation a `LOWRANK_CUDA_IMPL` value names (unset or empty: the default)."""
    if value is None or not value.strip():
        return DEFAULT
    impl = value.strip().lower()
    if impl not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a CUDA implementation; set it to one of {', '.join(CHOICES)}")
    return impl


@functools.cache
def cuda_impl() -> str:
    """The implementation `LOWRANK_CUDA_IMPL` selects, read once per process (cached)."""
    return parse_cuda_impl(os.environ.get(ENV_VAR))


# ---- sep_conv --------------------------------------------------------------------------


def _sep_conv_triton(input, weight_v, weight_h, bias, stride, padding, dilation, groups):
    from .triton import sep_conv_kernels

    return sep_conv_kernels.sep_conv_forward(
        input, weight_v, weight_h, bias, list(stride), list(padding), list(dilation), groups
    )


def _sep_conv_backward_triton(grad_out, input, weight_v, weight_h, stride, padding, dilation, groups, output_mask):
    from .triton import sep_conv_kernels

    return sep_conv_kernels.sep_conv_backward(
        grad_out, input, weight_v, weight_h, list(stride), list(padding), list(dilation), groups, list(output_mask)
    )


def _sep_conv_unfused(input, weight_v, weight_h, bias, stride, padding, dilation, groups):
    """The forward as two convolutions (cuDNN on CUDA); the output keeps the input's memory format,
    as the fake kernel promises."""
    _check_sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
    out = sep_conv_reference(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
    return out.contiguous(memory_format=suggest_memory_format(input))


def _sep_conv_backward_unfused(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight_v, grad_weight_h) of the two convolutions, through
    aten.convolution_backward (a kernel runs below autograd, so it cannot differentiate the
    forward itself). The intermediate is recomputed; a gradient not in output_mask is empty."""
    _check_sep_conv(input, weight_v, weight_h, None, stride, padding, dilation, groups)
    need_x, need_wv, need_wh = (bool(m) for m in output_mask)
    conv_backward = torch.ops.aten.convolution_backward.default
    first = ((stride[0], 1), (padding[0], 0), (dilation[0], 1))
    second = ((1, stride[1]), (0, padding[1]), (1, dilation[1]))
    t = torch.ops.aten.convolution.default(input, weight_v, None, *first, False, (0, 0), groups)
    grad_t, grad_wh, _ = conv_backward(
        grad_out, t, weight_h, None, *second, False, (0, 0), groups, [need_x or need_wv, need_wh, False]
    )
    grad_x = grad_wv = None
    if need_x or need_wv:
        grad_x, grad_wv, _ = conv_backward(
            grad_t, input, weight_v, None, *first, False, (0, 0), groups, [need_x, need_wv, False]
        )
    empty = input.new_empty((0,))
    return (
        grad_x.contiguous(memory_format=suggest_memory_format(input)) if need_x else empty,
        grad_wv.contiguous() if need_wv else empty,
        grad_wh.contiguous() if need_wh else empty,
    )


_SEP_CONV: dict[str, tuple[Callable, Callable]] = {
    "triton": (_sep_conv_triton, _sep_conv_backward_triton),
    "cudnn": (_sep_conv_unfused, _sep_conv_backward_unfused),
}


def sep_conv_kernels(impl: str) -> tuple[Callable, Callable]:
    """(forward, backward) of `impl` with the signatures of lowrank::sep_conv and
    lowrank::sep_conv_backward."""
    return _SEP_CONV[parse_cuda_impl(impl)]
