"""Orthogonal convolutions and orthogonality regularizers.

- `OrthogonalConv2d`: the convolution matrix [W; b] (k*k*C_in [+1] x C_out) is always the
  first C_out columns of a product of C_out Householder reflections, built with the blocked
  `householder_product` kernel (forward and backward), so it costs about as much as that.
- `orthogonality_loss(weight, bias=None)`: sum of squared cosines between different columns
  of [W; b].
- `orthonormality_loss(matrix)`: ||I - M^T M||_F^2.

Both losses are fused: one Gram GEMM forward and one GEMM backward, with the gradient in
closed form (no autograd graph of the intermediates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ._conv_args import _as_int
from .householder_product import householder_product

__all__ = ["OrthogonalConv2d", "orthogonality_loss", "orthonormality_loss"]


def _as_columns(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> torch.Tensor:
    """Rows of the result are the columns of the layer's (k*k*C_in [+1]) x C_out matrix [W; b]."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(f"{name}: weight must be a tensor with at least 2 dimensions (out, ...), got {weight!r}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name}: weight must be floating point, got {weight.dtype}")
    rows = weight.reshape(weight.shape[0], -1)
    if bias is None:
        return rows
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"{name}: bias must have the dtype and device of weight")
    return torch.cat([rows, bias.unsqueeze(1)], dim=1)


class _OrthogonalityLoss(torch.autograd.Function):
    # L = sum_{i != j} (u_i . u_j)^2 with u_i = x_i / |x_i|; dL/dU = 4 offdiag(U U^T) U.
    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        norms = rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny ** 0.5)
        unit = rows / norms
        off = unit @ unit.T
        off.diagonal().zero_()
        ctx.save_for_backward(unit, norms, off)
        return off.pow(2).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        unit, norms, off = ctx.saved_tensors
        grad_unit = (4 * grad) * (off @ unit)
        radial = (grad_unit * unit).sum(dim=1, keepdim=True)
        return (grad_unit - unit * radial) / norms


def orthogonality_loss(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonality loss: sum of squared cosines between different columns of [W; b].

    Args:
        weight: (out, ...) e.g. a conv weight (C_out, C_in, kh, kw) or a linear weight
            (out, in); the matrix has one column per output, k*k*C_in rows.
        bias: optional (out,), appended as one more row of that matrix.

    Returns:
        A scalar: sum over i != j of cos^2(angle between columns i and j). Zero columns count
        as orthogonal to everything. Differentiable (closed-form gradient).
    """
    return _OrthogonalityLoss.apply(_as_columns(weight, bias, "orthogonality_loss"))


class _OrthonormalityLoss(torch.autograd.Function):
    # ||I_n - M^T M||^2 = ||M M^T - I_m||^2 + (n - m): use the smaller Gram, no cancellation.
    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        rows, cols = matrix.shape
        if cols <= rows:
            residual = matrix.T @ matrix
        else:
            residual = matrix @ matrix.T
        residual.diagonal().sub_(1)
        ctx.save_for_backward(matrix, residual)
        ctx.cols_le_rows = cols <= rows
        return residual.pow(2).sum() + max(cols - rows, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        matrix, residual = ctx.saved_tensors
        # d/dM ||M^T M - I||^2 = 4 M (M^T M - I) = 4 (M M^T - I) M.
        scaled = (4 * grad) * residual
        return matrix @ scaled if ctx.cols_le_rows else scaled @ matrix


def orthonormality_loss(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormality loss ||I - M^T M||_F^2 for a (m, n) matrix M.

    Unlike `orthogonality_loss`, the column norms matter (they should be 1). Differentiable
    (closed-form gradient).
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"orthonormality_loss: matrix must be a 2-D tensor, got {getattr(matrix, 'shape', matrix)}")
    if not matrix.dtype.is_floating_point:
        raise ValueError(f"orthonormality_loss: matrix must be floating point, got {matrix.dtype}")
    return _OrthonormalityLoss.apply(matrix)


class OrthogonalConv2d(nn.Module):
    """Conv2d whose matrix [W; b] has orthonormal columns by construction (Householder parametrization).

    The (m x n) matrix, m = C_in*kh*kw (+1 with bias), n = C_out, is the first n columns of a
    product of n Householder reflections H(v) = I - 2 v v^T / |v|^2. The trainable `vectors`
    (m, n) follow a zero-padding scheme: reflector vector i (i = 1..n) has m - n + i
    free entries, zero-padded at the start; in `vectors` it is column n - i, whose entries
    above the diagonal are the padding (masked, never used). The product is taken in LAPACK's
    order (the reflector with the most free entries leftmost), which is what
    `householder_product` computes; the opposite order parametrizes the same set of matrices
    with orthonormal columns.

    The weight is W = matrix[:C_in*kh*kw].T reshaped to (C_out, C_in, kh, kw) (PyTorch's
    flattening order); the bias is the last row.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as in `nn.Conv2d`
            (padding may also be "valid" or "same").
        bias: learn a bias (the extra row of the matrix).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if _as_int(value) is None or _as_int(value) <= 0:
                raise ValueError(f"OrthogonalConv2d: {name} must be a positive int, got {value!r}")
        in_channels, out_channels = _as_int(in_channels), _as_int(out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if any(k <= 0 for k in self.kernel_size):
            raise ValueError(f"OrthogonalConv2d: kernel_size must be positive, got {kernel_size!r}")
        if any(s <= 0 for s in self.stride):
            raise ValueError(f"OrthogonalConv2d: stride must be positive, got {stride!r}")
        if isinstance(self.padding, str):
            if self.padding not in ("valid", "same"):
                raise ValueError(
                    f"OrthogonalConv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
                )
            if self.padding == "same" and self.stride != (1, 1):
                raise ValueError("OrthogonalConv2d: padding='same' needs stride 1")
        elif any(p < 0 for p in self.padding):
            raise ValueError(f"OrthogonalConv2d: padding must be non-negative, got {padding!r}")
        self.weight_rows = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.has_bias = bool(bias)
        rows = self.weight_rows + int(self.has_bias)
        if out_channels > rows:
            raise ValueError(
                f"OrthogonalConv2d: out_channels={out_channels} exceeds in_channels*kh*kw{'+1' if bias else ''}"
                f"={rows}; at most that many columns can be orthonormal"
            )
        self.vectors = nn.Parameter(torch.empty(rows, out_channels, device=device, dtype=dtype))
        self.register_buffer("_free", torch.ones(rows, out_channels, dtype=torch.bool).tril(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1, 1) free entries."""
        with torch.no_grad():
            self.vectors.uniform_(-1.0, 1.0)
            self.vectors.mul_(self._free)

    def reflectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, tau) for `householder_product`: H = I - tau y y^T equals I - 2 v v^T / |v|^2."""
        v = self.vectors * self._free
        unit = v / v.norm(dim=0).clamp_min(torch.finfo(v.dtype).tiny ** 0.5)
        # householder_product puts an implicit 1 on the diagonal: y = u / u_jj, tau = 2 u_jj^2.
        # A pivot too close to 0 is moved to +-eps (the reflector changes by O(eps^2)).
        pivot = unit.diagonal()
        eps = torch.finfo(v.dtype).eps
        sign = torch.where(pivot >= 0, 1.0, -1.0).to(pivot.dtype)
        pivot = torch.where(pivot.abs() < eps, sign * eps, pivot)
        return unit / pivot, 2 * pivot * pivot

    def matrix(self) -> torch.Tensor:
        """The (m, n) matrix [W; b] with orthonormal columns."""
        return householder_product(*self.reflectors())

    def _weight_and_bias(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = matrix[: self.weight_rows].T.reshape(self.out_channels, self.in_channels, *self.kernel_size)
        return weight, (matrix[self.weight_rows] if self.has_bias else None)

    @property
    def weight(self) -> torch.Tensor:
        """(C_out, C_in, kh, kw), differentiable."""
        return self._weight_and_bias(self.matrix())[0]

    @property
    def bias(self) -> torch.Tensor | None:
        """(C_out,) or None, differentiable."""
        return self._weight_and_bias(self.matrix())[1] if self.has_bias else None

    def orthogonality_error(self) -> float:
        """||M^T M - I||_F of the current matrix M = [W; b], in float64."""
        with torch.no_grad():
            m = self.matrix().double()
            return torch.linalg.matrix_norm(m.T @ m - torch.eye(m.shape[1], dtype=m.dtype, device=m.device)).item()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weight_and_bias(self.matrix())
        return F.conv2d(input, weight, bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.has_bias}"
        )
