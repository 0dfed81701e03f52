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
    """sep_conv as the two F.conv2d calls of DESIGN section 4."""
    t = F.conv2d(input, weight_v, None, (stride[0], 1), (padding[0], 0), (dilation[0], 1), groups)
    return F.conv2d(t, weight_h, bias, (1, stride[1]), (0, padding[1]), (1, dilation[1]), groups)


def batched_svd_reference(A: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batched_svd as torch.linalg.svd(A, full_matrices=False), truncated to the leading `rank` triplets."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if rank is not None:
        U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    return U, S, Vh
