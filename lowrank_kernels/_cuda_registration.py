"""CUDA kernels of the lowrank ops: Python functions launching Triton kernels, registered for the
CUDA dispatch key. Triton is imported on the first CUDA call, so importing lowrank_kernels works
without triton and without CUDA (the fake kernels and autograd in sep_conv.py are shared)."""

from __future__ import annotations

import torch


def _sep_conv_cuda(input, weight_v, weight_h, bias, stride, padding, dilation, groups):
    from .triton import _kernels

    return _kernels("sep_conv").sep_conv_forward(
        input, weight_v, weight_h, bias, list(stride), list(padding), list(dilation), groups
    )


def _sep_conv_backward_cuda(grad_out, input, weight_v, weight_h, stride, padding, dilation, groups, output_mask):
    from .triton import _kernels

    return _kernels("sep_conv").sep_conv_backward(
        grad_out, input, weight_v, weight_h, list(stride), list(padding), list(dilation), groups, list(output_mask)
    )


torch.library.register_kernel("lowrank::sep_conv", "cuda", _sep_conv_cuda)
torch.library.register_kernel("lowrank::sep_conv_backward", "cuda", _sep_conv_backward_cuda)
