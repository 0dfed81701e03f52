"""Triton householder_product (the CUDA path; on CPU tensors through TRITON_INTERPRET=1).

Same compact-WY algorithm as the CPU kernel (csrc/householder_product.cpp): reflectors are
grouped in panels of NB; a panel's product is I - Y T Y^T. The O(m n k) work runs in three
kernels, each program owning a tile of columns or rows of the (batched) matrix so no two
programs write the same memory:

- `_apply_panel_kernel`: Q[j0:, j0:] -= Y (T (Y^T Q[j0:, j0:])) for a column tile
  (or with T^T: the gradient propagated through a panel).
- `_project_kernel`: V = Y^T G and W = Y^T X for a column tile (backward).
- `_grad_y_kernel`: dL/dY = -(G W^T) T^T - (X V^T) T + Y (dS + dS^T) for a row tile,
  written into the strictly lower part of dL/dA (backward).

The per-panel NB x NB algebra (T from tau and Y^T Y, and its gradient) is a handful of tiny
batched torch ops on the host. The backward recomputes the forward and keeps the matrix state
before each panel (reflectors need not be orthogonal, so states cannot be un-applied)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..householder_product import _check

__all__ = ["householder_product", "householder_product_backward"]

_NB = 32  # reflectors per panel (tl.dot needs >= 16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_M = 32
_BLOCK_N = 32 if _INTERPRET else 64


@triton.jit
def _apply_panel_kernel(
    q_ptr,
    y_ptr,
    t_ptr,
    rows,
    cols,
    b,
    stride_qb,
    stride_qr,
    stride_yb,
    stride_tb,
    TRANS_T: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_n = tl.program_id(1)
    q_ptr += pid_b * stride_qb
    y_ptr += pid_b * stride_yb
    t_ptr += pid_b * stride_tb
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, NB)
    cmask = cn < cols
    kmask = kk < b
    acc = tl.zeros([NB, BLOCK_N], dtype=tl.float32 if q_ptr.dtype.element_ty == tl.float32 else tl.float64)
    for r0 in range(0, rows, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < rows
        y_t = tl.load(y_ptr + r[None, :] * NB + kk[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        q = tl.load(q_ptr + r[:, None] * stride_qr + cn[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(y_t, q, input_precision="ieee")
    if TRANS_T:
        t = tl.load(t_ptr + kk[None, :] * NB + kk[:, None])
    else:
        t = tl.load(t_ptr + kk[:, None] * NB + kk[None, :])
    tw = tl.dot(t, acc.to(t.dtype), input_precision="ieee")
    for r0 in range(0, rows, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < rows
        mask = rmask[:, None] & cmask[None, :]
        y = tl.load(y_ptr + r[:, None] * NB + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        ptrs = q_ptr + r[:, None] * stride_qr + cn[None, :]
        q = tl.load(ptrs, mask=mask, other=0.0)
        q -= tl.dot(y, tw.to(y.dtype), input_precision="ieee").to(q.dtype)
        tl.store(ptrs, q, mask=mask)


@triton.jit
def _project_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    v_ptr,
    w_ptr,
    rows,
    cols,
    b,
    stride_gb,
    stride_xb,
    stride_r,
    stride_yb,
    stride_vb,
    NB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_n = tl.program_id(1)
    g_ptr += pid_b * stride_gb
    x_ptr += pid_b * stride_xb
    y_ptr += pid_b * stride_yb
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, NB)
    cmask = cn < cols
    kmask = kk < b
    acc_dtype = tl.float32 if g_ptr.dtype.element_ty == tl.float32 else tl.float64
    v = tl.zeros([NB, BLOCK_N], dtype=acc_dtype)
    w = tl.zeros([NB, BLOCK_N], dtype=acc_dtype)
    for r0 in range(0, rows, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < rows
        mask = rmask[:, None] & cmask[None, :]
        y_t = tl.load(y_ptr + r[None, :] * NB + kk[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        g = tl.load(g_ptr + r[:, None] * stride_r + cn[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + r[:, None] * stride_r + cn[None, :], mask=mask, other=0.0)
        v += tl.dot(y_t, g, input_precision="ieee")
        w += tl.dot(y_t, x, input_precision="ieee")
    out = pid_b * stride_vb + kk[:, None] * cols + cn[None, :]
    mask = kmask[:, None] & cmask[None, :]
    tl.store(v_ptr + out, v, mask=mask)
    tl.store(w_ptr + out, w, mask=mask)


@triton.jit
def _grad_y_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    v_ptr,
    w_ptr,
    t_ptr,
    gsym_ptr,
    ga_ptr,
    rows,
    cols,
    b,
    stride_gb,
    stride_xb,
    stride_r,
    stride_yb,
    stride_vb,
    stride_tb,
    stride_gab,
    NB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2**31 elements
    pid_m = tl.program_id(1)
    g_ptr += pid_b * stride_gb
    x_ptr += pid_b * stride_xb
    y_ptr += pid_b * stride_yb
    v_ptr += pid_b * stride_vb
    w_ptr += pid_b * stride_vb
    t_ptr += pid_b * stride_tb
    gsym_ptr += pid_b * stride_tb
    ga_ptr += pid_b * stride_gab
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, NB)
    rmask = r < rows
    kmask = kk < b
    acc_dtype = tl.float32 if g_ptr.dtype.element_ty == tl.float32 else tl.float64
    gw = tl.zeros([BLOCK_M, NB], dtype=acc_dtype)  # G W^T
    xv = tl.zeros([BLOCK_M, NB], dtype=acc_dtype)  # X V^T
    for c0 in range(0, cols, BLOCK_N):
        cn = c0 + tl.arange(0, BLOCK_N)
        cmask = cn < cols
        mask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + r[:, None] * stride_r + cn[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + r[:, None] * stride_r + cn[None, :], mask=mask, other=0.0)
        wt_mask = cmask[:, None] & kmask[None, :]
        w_t = tl.load(w_ptr + kk[None, :] * cols + cn[:, None], mask=wt_mask, other=0.0)
        v_t = tl.load(v_ptr + kk[None, :] * cols + cn[:, None], mask=wt_mask, other=0.0)
        gw += tl.dot(g, w_t, input_precision="ieee")
        xv += tl.dot(x, v_t, input_precision="ieee")
    t = tl.load(t_ptr + kk[:, None] * NB + kk[None, :])
    t_t = tl.load(t_ptr + kk[None, :] * NB + kk[:, None])
    gsym = tl.load(gsym_ptr + kk[:, None] * NB + kk[None, :])
    y = tl.load(y_ptr + r[:, None] * NB + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    gy = tl.dot(y, gsym, input_precision="ieee")
    gy -= tl.dot(gw.to(t.dtype), t_t, input_precision="ieee")
    gy -= tl.dot(xv.to(t.dtype), t, input_precision="ieee")
    # Only the strictly lower entries of the panel are inputs (the rest are the implicit 1/0).
    lower = rmask[:, None] & kmask[None, :] & (r[:, None] > kk[None, :])
    tl.store(ga_ptr + r[:, None] * stride_r + kk[None, :], gy, mask=lower)


def _panels(k: int) -> list[tuple[int, int]]:
    return [(j0, min(_NB, k - j0)) for j0 in range(0, k, _NB)]


def _panel_algebra(a: torch.Tensor, tau: torch.Tensor, j0: int, b: int):
    """Y (B, m-j0, NB) zero-padded to NB columns, S = Y^T Y, U^{-1} and T = D U^{-1}, all (B, NB, NB)."""
    batch, m, _ = a.shape
    y = a.new_zeros(batch, m - j0, _NB)
    y[:, :, :b] = a[:, j0:, j0 : j0 + b].tril(-1)
    idx = torch.arange(b, device=a.device)
    y[:, idx, idx] = 1
    s = y.transpose(1, 2) @ y
    d = a.new_zeros(batch, _NB)
    d[:, :b] = tau[:, j0 : j0 + b]
    u = torch.eye(_NB, dtype=a.dtype, device=a.device) + s.triu(1) * d[:, None, :]
    uinv = torch.linalg.solve_triangular(u, torch.eye(_NB, dtype=a.dtype, device=a.device).expand_as(u), upper=True)
    t = d[:, :, None] * uinv
    return y.contiguous(), s, uinv, t.contiguous(), d


def _apply(q: torch.Tensor, y: torch.Tensor, t: torch.Tensor, j0: int, b: int, trans_t: bool) -> None:
    batch, m, n = q.shape
    rows, cols = m - j0, n - j0
    block = q[:, j0:, j0:]
    grid = (batch, triton.cdiv(cols, _BLOCK_N))
    _apply_panel_kernel[grid](
        block, y, t, rows, cols, b, q.stride(0), q.stride(1), y.stride(0), t.stride(0),
        TRANS_T=trans_t, NB=_NB, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
    )  # fmt: skip


def _flatten(A: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n, k = A.shape[-2], A.shape[-1], tau.shape[-1]
    return A.reshape(-1, m, n).contiguous(), tau.reshape(-1, k).contiguous()


def _forward(a: torch.Tensor, tau: torch.Tensor, keep_states: bool):
    batch, m, n = a.shape
    q = torch.eye(m, n, dtype=a.dtype, device=a.device).expand(batch, m, n).contiguous()
    states = []
    for j0, b in reversed(_panels(tau.shape[-1])):
        y, s, uinv, t, d = _panel_algebra(a, tau, j0, b)
        if keep_states:
            states.append((j0, b, y, s, uinv, t, d, q.clone()))
        _apply(q, y, t, j0, b, trans_t=False)
    return q, states[::-1]


def householder_product(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Triton `householder_product` (same contract as torch.linalg.householder_product), no autograd."""
    _check(A, tau)
    if A.numel() == 0:
        return A.new_empty(A.shape)
    a, t = _flatten(A, tau)
    q, _ = _forward(a, t, keep_states=False)
    return q.reshape(A.shape)


def householder_product_backward(
    grad: torch.Tensor, A: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of <grad, householder_product(A, tau)> w.r.t. A (strictly lower part) and tau."""
    _check(A, tau, "householder_product_backward")
    if grad.shape != A.shape or grad.dtype != A.dtype or grad.device != A.device:
        raise ValueError("householder_product_backward: grad must have the shape, dtype and device of input")
    grad_a = torch.zeros(A.shape, dtype=A.dtype, device=A.device)
    grad_tau = torch.zeros(tau.shape, dtype=tau.dtype, device=tau.device)
    if A.numel() == 0 or tau.shape[-1] == 0:
        return grad_a, grad_tau
    a, t = _flatten(A, tau)
    batch, m, n = a.shape
    ga = grad_a.view(batch, m, n)
    gt = grad_tau.view(batch, -1)
    _, states = _forward(a, t, keep_states=True)
    gz = grad.reshape(batch, m, n).contiguous().clone()
    for j0, b, y, s, uinv, tmat, d, x in states:
        rows, cols = m - j0, n - j0
        v = a.new_zeros(batch, _NB, cols)
        w = a.new_zeros(batch, _NB, cols)
        g_blk, x_blk = gz[:, j0:, j0:], x[:, j0:, j0:]
        _project_kernel[(batch, triton.cdiv(cols, _BLOCK_N))](
            g_blk, x_blk, y, v, w, rows, cols, b, gz.stride(0), x.stride(0), n, y.stride(0), v.stride(0),
            NB=_NB, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        )  # fmt: skip
        # T = D U^{-1}, U = I + striu(S) D: dT -> (dtau, dS), tiny batched algebra.
        grad_t = -(v @ w.transpose(1, 2))
        mm = grad_t @ uinv.transpose(1, 2)
        nn = -(tmat.transpose(1, 2) @ mm)
        gt[:, j0 : j0 + b] = (mm.diagonal(dim1=1, dim2=2) + (s.triu(1) * nn).sum(1))[:, :b]
        gs = (nn * d[:, None, :]).triu(1)
        gsym = (gs + gs.transpose(1, 2)).contiguous()
        _grad_y_kernel[(batch, triton.cdiv(rows, _BLOCK_M))](
            g_blk, x_blk, y, v, w, tmat, gsym, ga[:, j0:, j0:], rows, cols, b, gz.stride(0), x.stride(0), n,
            y.stride(0), v.stride(0), tmat.stride(0), ga.stride(0),
            NB=_NB, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        )  # fmt: skip
        _apply(gz, y, tmat, j0, b, trans_t=True)
    return grad_a, grad_tau
