"""Triton batched SVD: one matrix per program, parallel (round-robin) one-sided Jacobi.

Each program keeps W = A (or A^T for wide A; l x k, zero-padded to powers of two) and the
accumulated rotations V (k x k) in registers. A round-robin round pairs every column with
exactly one partner, so all k/2 rotations of a round are independent: the program computes
the Gram matrix G = W^T W with one ``tl.dot`` (full fp32/fp64 precision, ``ieee``), reads
alpha = G_pp, beta = G_qq, gamma = G_pq for every pair, builds the block rotation R and applies
it with ``tl.dot`` (W <- W R, V <- V R). Sweeps repeat until no pair of a sweep needed a
rotation (|gamma| > tol sqrt(alpha beta)), up to ``max_sweeps``.

The host wrapper does the O(size) parts with torch ops: power-of-two scaling per matrix,
NaN/inf handling, then sigma_j = |w_j|, sorting, normalization, orthonormal completion of
numerically zero columns and the sign convention -- the same contract as the CPU kernel.
Matrices with min(m, n) > 64 or max(m, n) > 256 go to ``torch.linalg.svd`` with the same contract
applied on top (sign convention, NaN only for the matrices holding a NaN or inf).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..batched_svd import _sign_convention

__all__ = ["batched_svd"]

_MAX_K = 64
_MAX_L = 256
TILE_SIZES = (16, 32, 64, 128, 256)  # BL and BK are powers of two from 16 (tl.dot's minimum)


def _num_warps(BL: int, BK: int, dtype: torch.dtype) -> int:
    """Warps per matrix: enough threads that W (BL x BK) and V, G, R (BK x BK) fit the registers of
    one block (about 64 of a thread's 255 registers each), capped at 16 warps."""
    words = (BL * BK + 3 * BK * BK) * (2 if dtype == torch.float64 else 1)
    return max(4, min(16, triton.next_power_of_2(triton.cdiv(words, 32 * 64))))


@triton.jit
def _jacobi_kernel(
    W_ptr,  # (B, BL, BK) in/out: columns are the working vectors
    V_ptr,  # (B, BK, BK) out: accumulated rotations
    status_ptr,  # (B,) int32 out: sweeps used, or -1 if not converged
    tol2,
    max_sweeps,
    BL: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BL)
    cols = tl.arange(0, BK)
    w_offs = rows[:, None] * BK + cols[None, :]
    W = tl.load(W_ptr + pid * BL * BK + w_offs)
    kr = tl.arange(0, BK)
    eye = kr[:, None] == cols[None, :]
    V = tl.where(eye, 1.0, 0.0).to(W.dtype)
    n_odd = BK - 1  # round-robin over BK players: i pairs with (r - i) mod n_odd, the fixed one with the rest
    half_inv = (n_odd + 1) // 2  # inverse of 2 modulo n_odd
    sweeps = 0
    rotating = 1
    while (rotating > 0) & (sweeps < max_sweeps):
        rotating = 0
        for r in range(0, n_odd):
            partner = (r - cols + n_odd) % n_odd
            partner = tl.where(partner == cols, n_odd, partner)
            partner = tl.where(cols == n_odd, (r * half_inv) % n_odd, partner)
            G = tl.dot(tl.trans(W), W, input_precision="ieee")
            diag = tl.sum(tl.where(eye, G, 0.0), axis=1)  # G_ii, indexed by i
            gamma = tl.sum(tl.where(cols[None, :] == partner[:, None], G, 0.0), axis=1)  # G_{i, partner(i)}
            diag_partner = tl.sum(tl.where(cols[None, :] == partner[:, None], diag[None, :], 0.0), axis=1)
            is_p = cols < partner
            alpha = tl.where(is_p, diag, diag_partner)  # |w_p|^2 with p = min(i, partner)
            beta = tl.where(is_p, diag_partner, diag)
            need = gamma * gamma > tol2 * alpha * beta
            safe_gamma = tl.where(need, gamma, 1.0)
            zeta = (beta - alpha) / (2.0 * safe_gamma)
            az = tl.abs(zeta)
            zc = tl.minimum(az, 1e18)
            root = tl.maximum(tl.sqrt(zc * zc + 1.0), az)
            t = 1.0 / (az + root)
            t = tl.where(zeta < 0, -t, t)
            c = 1.0 / tl.sqrt(t * t + 1.0)
            s = c * t
            c = tl.where(need, c, 1.0)
            s = tl.where(need, s, 0.0)
            rotating += tl.sum(need.to(tl.int32), axis=0)
            # Column i of W R: c w_i + (i is p ? -s : s) w_partner(i).
            off = tl.where(is_p, -s, s)
            R = tl.where(eye, c[None, :], 0.0) + tl.where(kr[:, None] == partner[None, :], off[None, :], 0.0)
            R = R.to(W.dtype)
            W = tl.dot(W, R, input_precision="ieee")
            V = tl.dot(V, R, input_precision="ieee")
        sweeps += 1
    tl.store(W_ptr + pid * BL * BK + w_offs, W)
    tl.store(V_ptr + pid * BK * BK + kr[:, None] * BK + cols[None, :], V)
    tl.store(status_ptr + pid, tl.where(rotating > 0, -1, sweeps))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _complete_columns(Q: torch.Tensor, deficient: torch.Tensor) -> torch.Tensor:
    """Replace the flagged columns of each (l, k) matrix in Q by unit vectors orthogonal to the rest."""
    Q = Q.clone()
    for b in deficient.any(-1).nonzero().flatten().tolist():
        l = Q.shape[-2]
        good = (~deficient[b]).clone()
        for j in deficient[b].nonzero().flatten().tolist():
            basis = Q[b][:, good]
            cand = torch.eye(l, dtype=Q.dtype, device=Q.device)
            for _ in range(2):  # Gram-Schmidt twice
                cand = cand - basis @ (basis.mT @ cand)
            norms = cand.norm(dim=0)
            best = int(norms.argmax())
            Q[b, :, j] = cand[:, best] / norms[best]
            good[j] = True
    return Q


def _finish(
    W: torch.Tensor, V: torch.Tensor, scale: torch.Tensor, wide: bool, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma, sort, normalize, complete, fix signs. W (B, l, k), V (B, k, k), scale (B,)."""
    sigma = W.norm(dim=-2)  # (B, k)
    smax = sigma.amax(-1, keepdim=True)
    eps = torch.finfo(W.dtype).eps
    deficient = ~(sigma > smax * eps * eps) | (sigma == 0)
    Q = W / torch.where(deficient, 1.0, sigma).unsqueeze(-2)
    Q = torch.where(deficient.unsqueeze(-2), 0.0, Q)
    if bool(deficient.any()):
        Q = _complete_columns(Q, deficient)
    S, order = torch.sort(sigma, dim=-1, descending=True, stable=True)
    order = order[..., :rank]
    S = S[..., :rank] / scale.unsqueeze(-1)
    Q = torch.gather(Q, -1, order.unsqueeze(-2).expand(-1, Q.shape[-2], -1))
    V = torch.gather(V, -1, order.unsqueeze(-2).expand(-1, V.shape[-2], -1))
    right, left = (Q, V) if wide else (V, Q)  # columns: right / left singular vectors
    U, Vh = _sign_convention(left, right.mT)
    return U, S, Vh


def batched_svd(
    A: torch.Tensor, rank: int | None = None, *, max_sweeps: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``A = U diag(S) Vh`` of (..., m, n), same contract as ``lowrank_kernels.batched_svd``.

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton
    was imported. Not differentiable by itself: use ``lowrank_kernels.batched_svd`` (the op
    dispatches here for CUDA tensors and carries the autograd formula).
    """
    from ..batched_svd import _check_args, _lapack_with_contract

    r = _check_args(A, rank, max_sweeps)
    if not A.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton.batched_svd: CPU tensors need TRITON_INTERPRET=1 set before triton is imported "
            "(or use lowrank_kernels.batched_svd, the C++ kernel)"
        )
    *batch, m, n = A.shape
    k, l = min(m, n), max(m, n)
    if A.numel() == 0:
        return A.new_empty((*batch, m, r)), A.new_empty((*batch, r)), A.new_empty((*batch, r, n))
    if k > _MAX_K or l > _MAX_L:
        return _lapack_with_contract(A, r)
    A3 = A.reshape(-1, m, n)
    wide = m < n
    finite = torch.isfinite(A3).all(-1).all(-1)
    A3 = torch.where(finite[:, None, None], A3, 0.0)
    amax = A3.abs().amax((-2, -1))
    _, exponent = torch.frexp(amax)
    scale = torch.ldexp(torch.ones_like(amax), -exponent)  # power of two: exact
    Wt = (A3.mT if wide else A3) * scale[:, None, None]  # (B, l, k)
    BL, BK = _next_pow2(max(l, 16)), _next_pow2(max(k, 16))  # tl.dot needs >= 16
    B = A3.shape[0]
    W = torch.zeros((B, BL, BK), dtype=A.dtype, device=A.device)
    W[:, :l, :k] = Wt
    V = torch.empty((B, BK, BK), dtype=A.dtype, device=A.device)
    status = torch.empty((B,), dtype=torch.int32, device=A.device)
    eps = torch.finfo(A.dtype).eps
    # fp32 Gram entries carry ~sqrt(l) eps rounding noise: converge just above it.
    tol = (4.0 if A.dtype == torch.float32 else 1.0) * (l**0.5) * eps
    _jacobi_kernel[(B,)](W, V, status, tol * tol, max_sweeps, BL=BL, BK=BK, num_warps=_num_warps(BL, BK, A.dtype))
    failed = ((status < 0) & finite).nonzero()
    if failed.numel():
        raise RuntimeError(
            f"batched_svd: one-sided Jacobi did not converge within max_sweeps={max_sweeps} sweeps "
            f"for matrix {int(failed[0])} of the flattened batch (shape {tuple(A.shape)})"
        )
    U, S, Vh = _finish(W[:, :l, :k], V[:, :k, :k], scale, wide, r)
    nan = torch.tensor(float("nan"), dtype=A.dtype, device=A.device)
    U = torch.where(finite[:, None, None], U, nan)
    S = torch.where(finite[:, None], S, nan)
    Vh = torch.where(finite[:, None, None], Vh, nan)
    return (
        U.reshape(*batch, m, r).contiguous(),
        S.reshape(*batch, r).contiguous(),
        Vh.reshape(*batch, r, n).contiguous(),
    )
