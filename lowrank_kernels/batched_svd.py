"""batched_svd: thin SVD of many small matrices at once, with a backward that stays finite.

The schema and the CPU kernel (vectorized across matrices: one-sided Jacobi for float64 and
float32 up to 8 x 8, an eigen-decomposition of A^T A in double for larger float32) live in
csrc/batched_svd.cpp; the CUDA kernel is Triton (lowrank_kernels/triton/batched_svd_kernels.py,
imported on first use). This file adds the Python entry point, the fake kernel used
by torch.compile/torch.export, and autograd.

Backward (degenerate singular values). The standard formula (PyTorch's ``svd_backward``)
divides by sigma_j^2 - sigma_i^2 and by sigma_i, so repeated or zero singular values give
inf/NaN. We write::

    (J_ij s_j + s_i K_ij) / (s_j^2 - s_i^2)
        = 1/2 (J + K)_ij / (s_j - s_i) + 1/2 (J - K)_ij / (s_j + s_i)

with J = skew(U^T gU), K = skew(V^T gV), and replace each 1/x (also the 1/sigma of the
projection terms) by the Lorentzian x / (x^2 + eta^2), eta = 100 * eps(dtype) * sigma_max.
The first term is the common rotation of u_i, v_j inside a (near-)degenerate pair, the
second their relative rotation.

* Gaps |s_j - s_i| >> eta and s_i >> eta: the exact gradient (gradcheck passes).
* Repeated or zero singular values: always finite (torch's gradient is inf/NaN there).
  The common-rotation term of a degenerate pair is dropped (it is 0 * inf: the numerator
  J + K vanishes exactly for every loss that is invariant under the arbitrary choice of
  basis inside the degenerate subspace). The result is exact for losses that depend on a
  degenerate block only through S or through its whole subspace (projectors, functions of
  the singular values such as the nuclear norm). It is not the gradient for losses that are
  smooth at the degeneracy only through a cancellation between the singular-value split
  and the basis rotation (e.g. the full reconstruction U diag(S) Vh): at an exact
  degeneracy that gradient is not determined by (U, S, Vh, gU, gS, gVh) at all, so no
  backward formula of this form can return it; we return the finite part.
* Truncated (rank=r) results: the backward recomputes the full thin SVD, so the coupling
  to the discarded triplets is included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._conv_args import _as_int

__all__ = ["batched_svd"]

_DEFAULT_MAX_SWEEPS = 40
_ETA_EPS = 100.0  # eta = _ETA_EPS * eps(dtype) * sigma_max


def cpu_capability() -> str:
    """The instruction-set level the hand-written CPU SIMD kernels run at in this process:
    "avx512", "avx2" or "default" (portable code; always on non-x86 CPUs).

    The highest level the CPU supports, capped by the environment variable
    LOWRANK_CPU_CAPABILITY=default|avx2|avx512 (read once, at the first kernel call; a level
    above the CPU's falls back to the CPU's with a warning, any other value is a ValueError)."""
    return torch.ops.lowrank.cpu_capability()


def batched_svd(
    A: torch.Tensor, rank: int | None = None, *, max_sweeps: int = _DEFAULT_MAX_SWEEPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices: ``A = U @ diag(S) @ Vh``.

    Same contract as ``torch.linalg.svd(A, full_matrices=False)``: ``A`` has shape (..., m, n),
    tall or wide, float32 or float64; returns U (..., m, k), S (..., k) sorted descending and
    non-negative, Vh (..., k, n), with k = min(m, n), or k = ``rank`` (the leading ``rank``
    triplets) when given. Signs are fixed so that the largest entry of each right singular
    vector (row of Vh) is positive. Zero singular values get orthonormal completion vectors,
    so U^T U = I and Vh Vh^T = I always hold.

    A matrix containing NaN or inf gives NaN for all of its U, S, Vh (the others in the
    batch are unaffected). A finite matrix whose iteration has not converged raises
    RuntimeError: after ``max_sweeps`` Jacobi sweeps (float64, float32 up to 8 x 8; typical
    6-11), or ``max_sweeps`` implicit QR steps for one eigenvalue of A^T A (larger float32;
    typical 1-3). It does not happen in practice with the default.

    Autograd: gradients for U, S and Vh; finite for repeated, zero and rank-deficient
    singular values (see the module docstring for the exact treatment).
    """
    if rank is not None:
        if _as_int(rank) is None:
            raise ValueError(f"batched_svd: rank must be an int or None, got {rank!r}")
        rank = _as_int(rank)
    if _as_int(max_sweeps) is None:
        raise ValueError(f"batched_svd: max_sweeps must be an int, got {max_sweeps!r}")
    max_sweeps = _as_int(max_sweeps)
    if not isinstance(A, torch.Tensor):
        raise ValueError(f"batched_svd: A must be a Tensor, got {type(A).__name__}")
    return torch.ops.lowrank.batched_svd(A, rank, max_sweeps)


def _check_args(A: torch.Tensor, rank: int | None, max_sweeps: int) -> int:
    """Python mirror of the C++ checks (for the fake kernel); returns the output rank."""
    if A.dim() < 2:
        raise ValueError(f"batched_svd: A must have at least 2 dimensions (..., m, n), got {A.dim()}-D")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"batched_svd: A must be float32 or float64, got {A.dtype}")
    if max_sweeps < 1:
        raise ValueError(f"batched_svd: max_sweeps must be >= 1, got {max_sweeps}")
    k = min(A.shape[-2], A.shape[-1])
    if rank is None:
        return k
    if rank < 1 or rank > k:
        raise ValueError(f"batched_svd: rank must be in [1, min(m, n)] = [1, {k}], got {rank}")
    return rank


def _sign_convention(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of its right vector (row of Vh) is
    positive, as the C++ and Triton Jacobi kernels do."""
    big = torch.gather(Vh, -1, Vh.abs().argmax(-1, keepdim=True))  # (..., k, 1)
    sign = torch.where(big < 0, -1.0, 1.0).to(Vh.dtype)
    return U * sign.mT, Vh * sign


def _lapack_with_contract(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd with this op's contract on top, for matrices beyond the Jacobi kernels'
    sizes: truncation to `rank`, the sign convention, and NaN results for exactly the matrices
    holding a NaN or inf (the others are decomposed as if those were absent)."""
    finite = torch.isfinite(A).flatten(-2).all(-1)
    clean = torch.where(finite[..., None, None], A, torch.zeros((), dtype=A.dtype, device=A.device))
    U, S, Vh = torch.linalg.svd(clean, full_matrices=False)
    U, Vh = _sign_convention(U[..., :rank], Vh[..., :rank, :])
    nan = torch.full((), float("nan"), dtype=A.dtype, device=A.device)
    return (
        torch.where(finite[..., None, None], U, nan).contiguous(),
        torch.where(finite[..., None], S[..., :rank], nan).contiguous(),
        torch.where(finite[..., None, None], Vh, nan).contiguous(),
    )


@torch.library.register_fake("lowrank::batched_svd")
def _batched_svd_fake(A, rank=None, max_sweeps=_DEFAULT_MAX_SWEEPS):
    r = _check_args(A, rank, max_sweeps)
    *batch, m, n = A.shape
    return A.new_empty((*batch, m, r)), A.new_empty((*batch, r)), A.new_empty((*batch, r, n))


def _lorentzian_inverse(x: torch.Tensor, eta2: torch.Tensor) -> torch.Tensor:
    """x / (x^2 + eta^2): 1/x for |x| >> eta, finite (0 at x = 0) near zero."""
    return x / (x * x + eta2)


def _skew(X: torch.Tensor) -> torch.Tensor:
    return X - X.mT


def svd_backward_stable(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    gU: torch.Tensor | None,
    gS: torch.Tensor | None,
    gVh: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient w.r.t. A of a loss of the thin SVD (U, S, Vh) of A, k = min(m, n) (not truncated).

    PyTorch's ``svd_backward`` with the degenerate-safe denominators of the module docstring.
    Written in plain differentiable torch ops, so double backward works.
    """
    m, k, n = U.shape[-2], S.shape[-1], Vh.shape[-1]
    finfo = torch.finfo(S.dtype)
    eta = (_ETA_EPS * finfo.eps) * S[..., :1]  # (..., 1); S is sorted, S[..., 0] = sigma_max
    eta2 = (eta * eta).clamp_min(finfo.tiny).unsqueeze(-1)  # (..., 1, 1)
    inner = torch.zeros(S.shape + (k,), dtype=S.dtype, device=S.device)
    if gU is not None or gVh is not None:
        J = _skew(U.mT @ gU) if gU is not None else torch.zeros_like(inner)
        K = _skew(Vh @ gVh.mT) if gVh is not None else torch.zeros_like(inner)
        s_row, s_col = S.unsqueeze(-2), S.unsqueeze(-1)  # s_j (varies along columns), s_i
        inner = inner + 0.5 * (J + K) * _lorentzian_inverse(s_row - s_col, eta2)
        inner = inner + 0.5 * (J - K) * _lorentzian_inverse(s_row + s_col, eta2)
    if gS is not None:
        inner = inner + torch.diag_embed(gS)
    gA = U @ inner @ Vh
    s_inv = _lorentzian_inverse(S, eta2.squeeze(-1))  # (..., k)
    if gU is not None and m > k:
        proj = gU - U @ (U.mT @ gU)  # (I - U U^T) gU
        gA = gA + (proj * s_inv.unsqueeze(-2)) @ Vh
    if gVh is not None and n > k:
        proj = gVh - (gVh @ Vh.mT) @ Vh  # gVh (I - V V^T)
        gA = gA + U @ (s_inv.unsqueeze(-1) * proj)
    return gA


def _setup_context(ctx, inputs, output):
    A, rank, max_sweeps = inputs
    U, S, Vh = output
    ctx.truncated = rank is not None and rank < min(A.shape[-2], A.shape[-1])
    ctx.max_sweeps = max_sweeps
    ctx.rank = rank
    ctx.save_for_backward(A if ctx.truncated else None, U, S, Vh)


def _backward(ctx, gU, gS, gVh):
    A, U, S, Vh = ctx.saved_tensors
    if ctx.truncated:
        # Truncated factors couple to the discarded triplets: differentiate the full thin
        # SVD (same deterministic kernel, so its leading triplets are exactly U, S, Vh) with
        # zero gradients for the discarded part.
        with torch.no_grad():
            U, S, Vh = torch.ops.lowrank.batched_svd(A, None, ctx.max_sweeps)
        pad = S.shape[-1] - ctx.rank
        gU = F.pad(gU, (0, pad)) if gU is not None else None
        gS = F.pad(gS, (0, pad)) if gS is not None else None
        gVh = F.pad(gVh, (0, 0, 0, pad)) if gVh is not None else None
    return svd_backward_stable(U, S, Vh, gU, gS, gVh), None, None


torch.library.register_autograd("lowrank::batched_svd", _backward, setup_context=_setup_context)


# CUDA: the Triton kernel, imported on the first call so that importing lowrank_kernels needs
# neither triton nor a GPU.
def _batched_svd_cuda(A, rank=None, max_sweeps=_DEFAULT_MAX_SWEEPS):
    from .triton import batched_svd_kernels

    return batched_svd_kernels.batched_svd(A, rank, max_sweeps=max_sweeps)


torch.library.register_kernel("lowrank::batched_svd", "cuda", _batched_svd_cuda)
