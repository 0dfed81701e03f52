"""Low-rank layers and their closed-form construction from trained dense layers.

`SepConv2d` runs on the fused `sep_conv` op; `SepConv2d.from_conv` is the decomposition of
Tai et al. 2016 ("Convolutional neural networks with low-rank regularization", section 3.1):
per group, the (N/g, C/g, dv, dh) kernel is rearranged into the (C/g*dv) x (dh*N/g) matrix

    M[(c, y), (x, n)] = W[n, c, y, x]

whose rank-K truncated SVD U_K S_K V_K^T is the best rank-K approximation of the kernel in the
Frobenius norm (Eckart-Young), so the reconstruction error equals the norm of the dropped
singular values. The vertical factor is U_K sqrt(S_K) (K dv x 1 filters over C/g channels),
the horizontal factor sqrt(S_K) V_K^T (N 1 x dh filters over K/g channels).

`LowRankLinear.from_linear` is the same idea for fully connected layers (truncated SVD of the weight):
W = U_K sqrt(S_K) . sqrt(S_K) V_K^T, two thin linear maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._conv_args import IntOrPair, _as_int, _pair
from .sep_conv import sep_conv

__all__ = ["SepConv2d", "LowRankLinear"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_rank(rank: int, name: str = "rank") -> int:
    value = _as_int(rank)
    if value is None or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {rank!r}")
    return value


def _check_energy(energy: float) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    return float(energy)


def _tai_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C/g, dv, dh) conv kernel -> (g, C/g*dv, dh*N/g) stack of Tai et al.'s matrices."""
    n, cg, dv, dh = weight.shape
    w = weight.reshape(groups, n // groups, cg, dv, dh)  # (g, n, c, y, x)
    return w.permute(0, 2, 3, 4, 1).reshape(groups, cg * dv, dh * (n // groups))


def _tai_kernel(matrices: torch.Tensor, out_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `_tai_matrices`: (g, C/g*dv, dh*N/g) -> (N, C/g, dv, dh)."""
    g, rows, _ = matrices.shape
    dv, dh = kernel_size
    cg = rows // dv
    w = matrices.reshape(g, cg, dv, dh, out_channels // g).permute(0, 4, 1, 2, 3)
    return w.reshape(out_channels, cg, dv, dh)


def _layer_matrices(layer: nn.Module) -> torch.Tensor:
    """The (groups, rows, cols) matrices whose truncated SVD the decomposition of `layer` uses."""
    if isinstance(layer, nn.Conv2d):
        return _tai_matrices(layer.weight.detach(), layer.groups)
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().unsqueeze(0)
    raise ValueError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")


def _svd64(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float64 so that the kept/tail energies and the factors are accurate for fp32/fp16 weights.
    # Library code leaves torch's thread settings alone: they belong to the caller.
    return torch.linalg.svd(matrices.to(torch.float64), full_matrices=False)


def _rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest per-group rank whose kept squared singular values reach `energy` of the total in
    every group (s: (groups, r) singular values, sorted descending)."""
    energy = _check_energy(energy)
    e = s.to(torch.float64) ** 2
    total = e.sum(-1, keepdim=True)
    kept = e.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # The 1e-12 slack makes energy=1.0 mean "numerically full rank" despite rounding in cumsum.
    reached = kept >= energy - 1e-12
    return int(reached.float().argmax(-1).max().item()) + 1


def _resolve_rank(s: torch.Tensor, groups: int, rank: int | None, energy: float | None) -> int:
    """Total rank K (a multiple of `groups`) from an explicit rank or an energy fraction."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=")
    full = s.shape[-1]
    if energy is not None:
        return groups * _rank_for_energy(s, energy)
    rank = _check_rank(rank)
    if rank % groups:
        raise ValueError(f"rank must be a multiple of groups={groups} (each group gets rank/groups), got {rank}")
    if rank // groups > full:
        raise ValueError(f"rank {rank} exceeds the layer's full rank {groups * full} ({full} per group)")
    return rank


Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _factors(svd: Svd, rank_per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD with sqrt(S) split between the factors: (g, rows, k), (g, k, cols)."""
    u, s, vh = svd
    root = s[:, :rank_per_group].sqrt()
    return u[:, :, :rank_per_group] * root.unsqueeze(1), root.unsqueeze(2) * vh[:, :rank_per_group, :]


def _padding_sides(
    padding: IntOrPair | str, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """nn.Conv2d-style padding (int, pair, 'valid' or 'same') as (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
            tv, th = (d * (k - 1) for d, k in zip(dilation, kernel_size))
            return (tv // 2, tv - tv // 2, th // 2, th - th // 2)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {(ph, pw)}")
    return (ph, ph, pw, pw)


class SepConv2d(nn.Module):
    """A d_v x d_h convolution factored into a vertical (d_v x 1, C -> rank) and a horizontal
    (1 x d_h, rank -> N) convolution, run fused by `lowrank_kernels.sep_conv`.

    Arguments follow `nn.Conv2d`; `rank` is the number of intermediate channels K (a multiple of
    `groups`). The vertical factor takes the vertical stride/padding/dilation, the horizontal factor
    the horizontal ones. Non-zero padding modes (and the asymmetric padding of `padding='same'` with
    an even dilated kernel) are applied as an explicit `F.pad` before the op, as `nn.Conv2d` does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        rank: int,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels, out_channels, groups = (
            _check_rank(v, name)
            for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups))
        )
        rank = _check_rank(rank)
        if in_channels % groups or out_channels % groups or rank % groups:
            raise ValueError(
                f"in_channels ({in_channels}), out_channels ({out_channels}) and rank ({rank}) "
                f"must all be divisible by groups ({groups})"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.rank, self.groups = in_channels, out_channels, rank, groups
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size"))
        self.stride = tuple(_pair(stride, "stride"))
        self.dilation = tuple(_pair(dilation, "dilation"))
        for name, v in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if min(v) <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        self.padding_mode = padding_mode
        sides = _padding_sides(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding if isinstance(padding, str) else (sides[0], sides[2])
        self._sides = sides
        symmetric = sides[0] == sides[1] and sides[2] == sides[3]
        if padding_mode == "zeros" and symmetric:
            self._op_padding, self._explicit_pad = (sides[0], sides[2]), None
        else:
            self._op_padding = (0, 0)
            # F.pad wants (left, right, top, bottom).
            self._explicit_pad = (sides[2], sides[3], sides[0], sides[1])
        dv, dh = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight_v = nn.Parameter(torch.empty(rank, in_channels // groups, dv, 1, **factory))
        self.weight_h = nn.Parameter(torch.empty(out_channels, rank // groups, 1, dh, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default initialization, applied to each factor."""
        for w in (self.weight_v, self.weight_h):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight_v.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._explicit_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._explicit_pad, mode=mode)
        return sep_conv(
            input, self.weight_v, self.weight_h, self.bias, self.stride, self._op_padding, self.dilation, self.groups
        )

    def dense_weight(self) -> torch.Tensor:
        """The (N, C/g, dv, dh) kernel this layer computes (sum over rank of the factor products)."""
        g, k = self.groups, self.rank // self.groups
        n, dv, dh = self.out_channels, *self.kernel_size
        cg = self.in_channels // g
        v = self.weight_v.reshape(g, k, cg * dv)  # (g, k, rows)
        h = self.weight_h.reshape(g, n // g, k, dh).permute(0, 2, 3, 1).reshape(g, k, dh * (n // g))
        return _tai_kernel(v.transpose(1, 2) @ h, n, self.kernel_size)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int | None = None, energy: float | None = None) -> SepConv2d:
        """Closed-form decomposition of a trained `nn.Conv2d` (Tai et al. 2016), optimal for its rank.

        Give exactly one of `rank` (total intermediate channels K, a multiple of `conv.groups`;
        each group gets K/groups) or `energy` (in (0, 1]: the smallest per-group rank keeping that
        fraction of the squared singular values in every group). The bias moves to the horizontal
        factor. The result has the conv's dtype and device.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if not conv.weight.dtype.is_floating_point:
            raise ValueError(f"from_conv needs a floating-point conv weight, got {conv.weight.dtype}")
        svd = _svd64(_tai_matrices(conv.weight.detach(), conv.groups))
        return cls._from_svd(conv, _resolve_rank(svd[1], conv.groups, rank, energy), svd)

    @classmethod
    def _from_svd(cls, conv: nn.Conv2d, k_total: int, svd: Svd) -> SepConv2d:
        g = conv.groups
        left, right = _factors(svd, k_total // g)
        n, cg, dv, dh = conv.weight.shape
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            (dv, dh),
            k_total,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=g,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        k = k_total // g
        with torch.no_grad():
            # left: (g, C/g*dv, k) -> weight_v (g*k, C/g, dv, 1)
            layer.weight_v.copy_(left.transpose(1, 2).reshape(k_total, cg, dv, 1))
            # right: (g, k, dh*N/g) -> weight_h[n, k, 0, x] = right[g, k, x, n]
            wh = right.reshape(g, k, dh, n // g).permute(0, 3, 1, 2).reshape(n, k, 1, dh)
            layer.weight_h.copy_(wh)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer


class LowRankLinear(nn.Module):
    """y = (x W_in^T) W_out^T + b with W_in (rank, in_features), W_out (out_features, rank)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            _check_rank(v, name)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"device": device, "dtype": dtype}
        self.weight_in = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialization, applied to each factor."""
        for w in (self.weight_in, self.weight_out):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(input, self.weight_in), self.weight_out, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer computes."""
        return self.weight_out @ self.weight_in

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " + (
            f"bias={self.bias is not None}"
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
        """Truncated-SVD factorization of a trained `nn.Linear` (optimal for its rank).

        Give exactly one of `rank` or `energy` (in (0, 1]: smallest rank keeping that fraction of
        the squared singular values)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if not linear.weight.dtype.is_floating_point:
            raise ValueError(f"from_linear needs a floating-point weight, got {linear.weight.dtype}")
        svd = _svd64(linear.weight.detach().unsqueeze(0))
        return cls._from_svd(linear, _resolve_rank(svd[1], 1, rank, energy), svd)

    @classmethod
    def _from_svd(cls, linear: nn.Linear, k: int, svd: Svd) -> LowRankLinear:
        left, right = _factors(svd, k)
        layer = cls(
            linear.in_features,
            linear.out_features,
            k,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight_out.copy_(left[0])
            layer.weight_in.copy_(right[0])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer
