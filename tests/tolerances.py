"""Error bounds for the tests, derived from the dtype and the problem, never from one machine's results.

Sums of products: whatever the order, blocking or FMA use, a sum of n products computed in a format
with unit roundoff u satisfies |fl(sum a_i b_i) - sum a_i b_i| <= gamma_n * sum |a_i b_i|, with
gamma_n = n u / (1 - n u) (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1).
A chain of such sums (the two stages of sep_conv, or a product and its gradient) stays within
gamma of the summed lengths of the magnitude of the chain computed on absolute values.

SVD: a backward-stable SVD is exact for A + E with ||E||_2 <= p(m, n) eps ||A||_2, p a modestly
growing function of the size (LAPACK Users' Guide, 4.9). As LAPACK's own tests do, residuals are
scaled by max(m, n) eps and accepted below a fixed threshold ratio (30 here). Singular values
move by at most ||E||_2 (Weyl); a rank-k truncation moves by at most ||E||_2 (1 + 2 sigma_1 / delta),
delta = sigma_k - sigma_{k+1} the spectral gap at k (Wedin's sin-theta theorem)."""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(dtype: torch.dtype, n: int) -> float:
    """gamma_n of Higham for sums of n products accumulated in dtype."""
    nu = n * unit_roundoff(dtype)
    assert nu < 0.5, f"a sum of {n} terms in {dtype} has no useful error bound"
    return nu / (1 - nu)


def sum_bound(
    magnitude: torch.Tensor,
    length: int,
    accumulate: torch.dtype,
    storage: torch.dtype | None = None,
    roundings: int = 1,
) -> torch.Tensor:
    """Elementwise bound on |computed - exact| for a chain of sums of `length` products in all.

    magnitude: the same computation on absolute values (float64), i.e. sum |a_i b_i| per output.
    accumulate: the accumulation dtype. storage: the dtype results and intermediates are stored in
    (defaults to accumulate); `roundings` stores to it (intermediate tile, result) each add u_storage."""
    storage = storage or accumulate
    per_term = gamma(accumulate, length) + roundings * unit_roundoff(storage)
    # The float64 reference carries its own rounding of the same sums.
    return (per_term + gamma(torch.float64, length)) * magnitude.double()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, name: str = "result") -> None:
    """|actual - expected| <= bound elementwise (expected is float64); shapes must agree."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements outside the bound; first at flat index {i}: "
            f"got {actual.flatten()[i].item()!r}, expected {expected.flatten()[i].item()!r}, "
            f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
        )


SVD_THRESHOLD = 30


def svd_backward_error(dtype: torch.dtype, m: int, n: int) -> float:
    """Backward error ||E|| / ||A|| accepted for an SVD of an m x n matrix: threshold * max(m, n) * eps."""
    return SVD_THRESHOLD * max(m, n) * torch.finfo(dtype).eps


def truncation_gap_factor(S: torch.Tensor, k: int) -> torch.Tensor:
    """Per matrix, 1 + 2 sigma_1 / (sigma_k - sigma_{k+1}): how much a rank-k truncation amplifies a
    backward error (1 where k keeps every singular value). S: (..., min(m, n)) float64, descending."""
    if k >= S.shape[-1]:
        return torch.ones(S.shape[:-1], dtype=torch.float64)
    gap = (S[..., k - 1] - S[..., k]).clamp_min(torch.finfo(torch.float64).tiny)
    return 1 + 2 * S[..., 0] / gap


def _run(fn, tensors, gy):
    leaves = [t.detach().double().requires_grad_(gy is not None) if t is not None else None for t in tensors]
    out = fn(*leaves)
    if gy is None:
        return out.detach(), None
    out.backward(gy.double())
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def sep_conv_expected(x, wv, wh, b, args, gy=None, dtype=None):
    """The float64 two-conv reference of sep_conv on these values and, with gy, its gradients; plus
    the elementwise bound each result computed in `dtype` (default x.dtype) must meet.

    Returns (output, gradients or None, output bound, gradient bounds or None); gradients and bounds
    are listed for (input, weight_v, weight_h, bias), None where bias is None. 16-bit dtypes
    accumulate in float32 and round the intermediate tile and the result to the dtype."""
    from lowrank_kernels._reference import sep_conv_reference

    dtype = dtype or x.dtype

    def fn(*t):
        return sep_conv_reference(*t, *args)

    tensors = (x, wv, wh, b)
    ref, ref_grads = _run(fn, tensors, gy)
    mag, mag_grads = _run(fn, [t.abs() if t is not None else None for t in tensors], None if gy is None else gy.abs())
    B, _, _, W = x.shape
    Cg, dv, Kg, dh = wv.shape[1], wv.shape[2], wh.shape[1], wh.shape[3]
    Ng = wh.shape[0] // args[3]
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    kind = dict(accumulate=torch.float32 if sixteen_bit else dtype, storage=dtype, roundings=2 if sixteen_bit else 1)
    out_bound = sum_bound(mag, Cg * dv + Kg * dh + 1, **kind)
    if gy is None:
        return ref, None, out_bound, None
    # Every gradient is a chain of sums no longer than a pixel reduction plus both stages' taps.
    length = B * ref.shape[2] * max(W, ref.shape[3]) + Cg * dv + Kg * dh + Ng * dh + 1
    grad_bounds = [sum_bound(m, length, **kind) if m is not None else None for m in mag_grads]
    return ref, ref_grads, out_bound, grad_bounds
