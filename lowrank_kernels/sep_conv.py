"""sep_conv: fused separable low-rank convolution (d x 1 conv C -> K, then 1 x d conv K -> N).

The schema and CPU kernels live in csrc/sep_conv/; this file adds the Python entry
point, the fake (meta) kernels used by torch.compile/torch.export, and autograd.
The CUDA kernels are Triton (lowrank_kernels/triton/sep_conv.py)."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from ._conv_args import IntOrPair, _check_sep_conv, _pair

__all__ = ["sep_conv"]


def sep_conv(
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Separable low-rank convolution, fused: never materializes the (B, K, H', W) intermediate.

    Equal (up to rounding) to::

        t = F.conv2d(input, weight_v, None, (stride[0], 1), (padding[0], 0), (dilation[0], 1), groups)
        F.conv2d(t, weight_h, bias, (1, stride[1]), (0, padding[1]), (1, dilation[1]), groups)

    Args:
        input: (B, C, H, W), NCHW or channels_last; the output has the same memory format.
        weight_v: (K, C/groups, dv, 1), the vertical factor (rank K).
        weight_h: (N, K/groups, 1, dh), the horizontal factor.
        bias: optional (N,).
        stride, padding, dilation: int or (vertical, horizontal) pair; the vertical value
            applies to the first conv, the horizontal one to the second.
        groups: applied to both convolutions.
    """
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"sep_conv: groups must be an int, got {groups!r}")
    return torch.ops.lowrank.sep_conv(
        input,
        weight_v,
        weight_h,
        bias,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
        groups,
    )


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    # Same rule as the C++ kernels (Tensor::suggest_memory_format).
    return suggest_memory_format(t)


@torch.library.register_fake("lowrank::sep_conv")
def _sep_conv_fake(input, weight_v, weight_h, bias, stride, padding, dilation, groups):
    shape = _check_sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
    return input.new_empty(shape).contiguous(memory_format=_memory_format(input))


@torch.library.register_fake("lowrank::sep_conv_backward")
def _sep_conv_backward_fake(grad_out, input, weight_v, weight_h, stride, padding, dilation, groups, output_mask):
    _check_sep_conv(input, weight_v, weight_h, None, stride, padding, dilation, groups)

    def grad_like(t: torch.Tensor, needed: bool, fmt=torch.contiguous_format) -> torch.Tensor:
        return t.new_empty(t.shape).contiguous(memory_format=fmt) if needed else t.new_empty((0,))

    return (
        grad_like(input, output_mask[0], _memory_format(input)),
        grad_like(weight_v, output_mask[1]),
        grad_like(weight_h, output_mask[2]),
    )


def _setup_context(ctx, inputs, output):
    input, weight_v, weight_h, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight_v, weight_h)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _sep_conv_grads(ctx, grad_out, backward_op):
    """Autograd backward of sep_conv given the op computing (grad_input, grad_wv, grad_wh);
    shared by the registered autograd and the Triton interpreter path."""
    input, weight_v, weight_h = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_input, grad_wv, grad_wh = backward_op(
        grad_out, input, weight_v, weight_h, *ctx.conv_args, [need[0], need[1], need[2]]
    )
    grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and need[3] else None
    return (
        grad_input if need[0] else None,
        grad_wv if need[1] else None,
        grad_wh if need[2] else None,
        grad_bias,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, grad_out):
    return _sep_conv_grads(ctx, grad_out, torch.ops.lowrank.sep_conv_backward)


torch.library.register_autograd("lowrank::sep_conv", _backward, setup_context=_setup_context)
