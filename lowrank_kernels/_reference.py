"""Plain-torch references: the unfused computations our kernels must match.

Used by the tests, by the benchmarks (as the "unfused pair" users run today) and by
the ONNX export (the same two convolutions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sep_conv_reference(
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """sep_conv as two F.conv2d calls: the vertical d x 1 factor, then the horizontal 1 x d one
    (the op's definition, docs/design.md)."""
    t = F.conv2d(input, weight_v, None, (stride[0], 1), (padding[0], 0), (dilation[0], 1), groups)
    return F.conv2d(t, weight_h, bias, (1, stride[1]), (0, padding[1]), (1, dilation[1]), groups)


def batched_svd_reference(A: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batched_svd as torch.linalg.svd(A, full_matrices=False), truncated to the leading `rank` triplets."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if rank is not None:
        U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    return U, S, Vh


def householder_product_reference(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """householder_product by multiplying the explicit m x m reflectors (independent of LAPACK)."""
    m, n = A.shape[-2], A.shape[-1]
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    q = eye.expand(*A.shape[:-2], m, m)
    for i in range(tau.shape[-1]):
        v = torch.cat([A.new_zeros(*A.shape[:-2], i), A.new_ones(*A.shape[:-2], 1), A[..., i + 1 :, i]], dim=-1)
        h = eye - tau[..., i, None, None] * v.unsqueeze(-1) * v.unsqueeze(-2)
        q = q @ h
    return q[..., :n]


def orthogonality_loss_reference(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The orthogonality loss written directly: M = [W; b], cosines M^T M / (N^T N), sum minus the trace."""
    m = weight.reshape(weight.shape[0], -1).T
    if bias is not None:
        m = torch.cat([m, bias.unsqueeze(0)], dim=0)
    norms = m.norm(dim=0, keepdim=True)
    cos = (m.T @ m) / (norms.T @ norms)
    sq = cos.pow(2)
    return sq.sum() - sq.diagonal().sum()


def orthonormality_loss_reference(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormality loss written directly: sum_square(I - M^T M)."""
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    return (eye - matrix.T @ matrix).pow(2).sum()


def dense_reflector_product_reference(vectors: torch.Tensor) -> torch.Tensor:
    """First n columns of H(u_1) H(u_2) ... H(u_n), u_j = column j of `vectors` normalized, built
    naively: n dense m x m reflectors I - 2 u u^T multiplied one by one."""
    m, n = vectors.shape
    unit = vectors / vectors.norm(dim=0)
    eye = torch.eye(m, dtype=vectors.dtype, device=vectors.device)
    q = eye
    for j in range(n):
        q = q @ (eye - 2 * torch.outer(unit[:, j], unit[:, j]))
    return q[:, :n]
