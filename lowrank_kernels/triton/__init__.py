"""Triton implementations of the lowrank ops: callable on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 is set before triton is imported.

This module is imported by `import lowrank_kernels` and must work without triton and without CUDA,
so each entry point imports its kernel module (lowrank_kernels/triton/<op>_kernels.py, which
imports triton) on first call. The kernel modules carry a `_kernels` suffix so that no module
name shadows one of the public functions below."""

from __future__ import annotations

import torch

from .._conv_args import IntOrPair, _pair

__all__ = ["sep_conv", "batched_svd", "householder_product", "householder_product_backward"]


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
    """lowrank_kernels.sep_conv computed by the fused Triton kernels (differentiable).

    Same arguments and result as `lowrank_kernels.sep_conv`. CUDA tensors go through the op
    (torch.ops.lowrank.sep_conv, whose CUDA kernels are these Triton kernels), so torch.compile sees
    the same opaque op. CPU tensors run the kernels in the Triton interpreter (TRITON_INTERPRET=1 set
    before triton is imported), otherwise RuntimeError; ImportError if triton is not installed.
    """
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"sep_conv: groups must be an int, got {groups!r}")
    if isinstance(input, torch.Tensor) and input.is_cuda:
        from ..sep_conv import sep_conv as op

        return op(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
    from . import sep_conv_kernels

    return sep_conv_kernels.sep_conv(
        input,
        weight_v,
        weight_h,
        bias,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
        groups,
    )


def batched_svd(
    A: torch.Tensor, rank: int | None = None, *, max_sweeps: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lowrank_kernels.batched_svd computed by the Triton Jacobi kernel (not differentiable by itself).

    Same arguments and result as `lowrank_kernels.batched_svd`. CUDA tensors (or CPU tensors with
    TRITON_INTERPRET=1 set before triton is imported); ImportError if triton is not installed. For
    autograd on CUDA use `lowrank_kernels.batched_svd`, which dispatches here."""
    from . import batched_svd_kernels

    return batched_svd_kernels.batched_svd(A, rank, max_sweeps=max_sweeps)


def householder_product(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """lowrank_kernels.householder_product computed by the blocked compact-WY Triton kernels.

    Same contract as torch.linalg.householder_product. CUDA tensors (or CPU tensors with
    TRITON_INTERPRET=1 set before triton is imported); ImportError if triton is not installed. For
    autograd on CUDA use `lowrank_kernels.householder_product`, which dispatches here."""
    from . import householder_product_kernels

    return householder_product_kernels.householder_product(A, tau)


def householder_product_backward(
    grad: torch.Tensor, A: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dA, dtau) of householder_product for the output gradient `grad`, in Triton."""
    from . import householder_product_kernels

    return householder_product_kernels.householder_product_backward(grad, A, tau)
