"""sep_conv: fused separable low-rank convolution (d x 1 conv C -> K, then 1 x d conv K -> N).

The schema and CPU kernels live in csrc/sep_conv/; this file adds the Python entry
point, the fake (meta) kernels used by torch.compile/torch.export, and autograd.
The CUDA kernels are Triton (lowrank_kernels/triton/sep_conv_kernels.py), registered at the end
of this file like every op family's."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from . import _cuda_impl
from ._conv_args import IntOrPair, _as_int, _check_sep_conv, _pair

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
    group_count = _as_int(groups)
    if group_count is None:
        raise ValueError(f"sep_conv: groups must be an int, got {groups!r}")
    return torch.ops.lowrank.sep_conv(
        input,
        weight_v,
        weight_h,
        bias,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
        group_count,
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


def _differentiable_grads(ctx, grad_out):
    """The backward as a differentiable graph, for create_graph=True (double backward, gradient
    penalties): the gradients of the two-conv reference, which autograd can differentiate again.
    Only this case materializes the rank-K intermediate; a plain backward stays fused."""
    from ._reference import sep_conv_reference

    need = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need)]
        wanted = [t for t, n in zip(leaves, need[:3]) if n]
        out = sep_conv_reference(*leaves, None, *ctx.conv_args)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True) if wanted else ())
    grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and need[3] else None
    return (*(next(grads) if n else None for n in need[:3]), grad_bias, None, None, None, None)


def _sep_conv_grads(ctx, grad_out, backward_op):
    """Autograd backward of sep_conv given the op computing (grad_input, grad_wv, grad_wh);
    shared by the registered autograd and the Triton interpreter path."""
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient itself gets a graph
        return _differentiable_grads(ctx, grad_out)
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


# CUDA: the Triton kernels, imported on the first call so that importing lowrank_kernels needs
# neither triton nor a GPU; LOWRANK_CUDA_IMPL=cudnn selects the unfused pair instead (_cuda_impl.py).
def _sep_conv_cuda(input, weight_v, weight_h, bias, stride, padding, dilation, groups):
    forward, _ = _cuda_impl.sep_conv_kernels(_cuda_impl.cuda_impl())
    return forward(input, weight_v, weight_h, bias, stride, padding, dilation, groups)


def _sep_conv_backward_cuda(grad_out, input, weight_v, weight_h, stride, padding, dilation, groups, output_mask):
    _, backward = _cuda_impl.sep_conv_kernels(_cuda_impl.cuda_impl())
    return backward(grad_out, input, weight_v, weight_h, stride, padding, dilation, groups, output_mask)


torch.library.register_kernel("lowrank::sep_conv", "cuda", _sep_conv_cuda)
torch.library.register_kernel("lowrank::sep_conv_backward", "cuda", _sep_conv_backward_cuda)
