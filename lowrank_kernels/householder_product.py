"""householder_product: products of Householder reflections with a blocked (compact-WY) backward.

The schema and CPU kernels live in csrc/householder_product.cpp; this file adds the Python
entry point, the fake kernels used by torch.compile/torch.export, autograd, and the CUDA
registration (Triton, lowrank_kernels/triton/householder_product_kernels.py, imported on first use)."""

from __future__ import annotations

import torch

__all__ = ["householder_product"]


def householder_product(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """First n columns of H_1 H_2 ... H_k, with H_i = I - tau_i v_i v_i^T.

    Same contract as :func:`torch.linalg.householder_product`: ``A`` is (*, m, n) with
    m >= n, ``tau`` is (*, k) with k <= n and the same batch dimensions; v_i is column i of
    ``A`` below the diagonal with an implicit 1 on it (entries on and above the diagonal are
    ignored). float32 and float64. Differentiable in ``A`` and ``tau``; the backward is
    blocked (compact WY) instead of walking the reflectors one at a time.

    Returns:
        (*, m, n) tensor, contiguous.
    """
    return torch.ops.lowrank.householder_product(A, tau)


def _check(A: torch.Tensor, tau: torch.Tensor, name: str = "householder_product") -> None:
    # Mirrors check_householder in csrc/householder_product.cpp (fake and Triton paths).
    if A.dim() < 2:
        raise ValueError(f"{name}: input must have at least 2 dimensions, got {A.dim()}")
    if tau.dim() < 1:
        raise ValueError(f"{name}: tau must have at least 1 dimension, got {tau.dim()}")
    if A.dim() - tau.dim() != 1:
        raise ValueError(
            f"{name}: Expected tau to have one dimension less than input, but got tau.ndim equal to "
            f"{tau.dim()} and input.ndim is equal to {A.dim()}"
        )
    if A.shape[-2] < A.shape[-1]:
        raise ValueError(
            f"{name}: input.shape[-2] must be greater than or equal to input.shape[-1], got input.shape {list(A.shape)}"
        )
    if A.shape[-1] < tau.shape[-1]:
        raise ValueError(
            f"{name}: input.shape[-1] must be greater than or equal to tau.shape[-1], got input.shape "
            f"{list(A.shape)} and tau.shape {list(tau.shape)}"
        )
    if A.shape[:-2] != tau.shape[:-1]:
        raise ValueError(
            f"{name}: Expected batch dimensions of tau to be equal to input.shape[:-2], but got tau.shape "
            f"{list(tau.shape)} and input.shape {list(A.shape)}"
        )
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: input must be float32 or float64, got {A.dtype}")
    if tau.dtype != A.dtype:
        raise ValueError(f"{name}: tau dtype {tau.dtype} does not match input dtype {A.dtype}")
    if tau.device != A.device:
        raise ValueError(f"{name}: tau is on {tau.device} but input is on {A.device}")


@torch.library.register_fake("lowrank::householder_product")
def _householder_product_fake(A, tau):
    _check(A, tau)
    return A.new_empty(A.shape)


@torch.library.register_fake("lowrank::householder_product_backward")
def _householder_product_backward_fake(grad, A, tau):
    _check(A, tau, "householder_product_backward")
    return A.new_empty(A.shape), tau.new_empty(tau.shape)


def _setup_context(ctx, inputs, output):
    A, tau = inputs
    ctx.save_for_backward(A, tau)


def _differentiable_grads(ctx, grad):
    """The backward as a differentiable graph, for create_graph=True (double backward): the
    gradients of torch.linalg.householder_product, whose backward autograd can differentiate."""
    need = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need)]
        wanted = [t for t, n in zip(leaves, need) if n]
        out = torch.linalg.householder_product(*leaves)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True) if wanted else ())
    return tuple(next(grads) if n else None for n in need)


def _backward(ctx, grad):
    if torch.is_grad_enabled():  # backward(create_graph=True): differentiate torch's composite backward
        return _differentiable_grads(ctx, grad)
    A, tau = ctx.saved_tensors
    grad_a, grad_tau = torch.ops.lowrank.householder_product_backward(grad, A, tau)
    need_a, need_tau = ctx.needs_input_grad
    return (grad_a if need_a else None, grad_tau if need_tau else None)


torch.library.register_autograd("lowrank::householder_product", _backward, setup_context=_setup_context)


# CUDA: Triton kernels, imported on the first call so that importing lowrank_kernels needs
# neither triton nor a GPU.
def _householder_product_cuda(A, tau):
    from .triton import householder_product_kernels

    return householder_product_kernels.householder_product(A, tau)


def _householder_product_backward_cuda(grad, A, tau):
    from .triton import householder_product_kernels

    return householder_product_kernels.householder_product_backward(grad, A, tau)


torch.library.register_kernel("lowrank::householder_product", "cuda", _householder_product_cuda)
torch.library.register_kernel("lowrank::householder_product_backward", "cuda", _householder_product_backward_cuda)
