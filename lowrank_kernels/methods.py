"""The decomposition methods `compress` can use, in the form its rank rules need.

A rank rule works on a `LayerSpectrum`: a total rank K (a multiple of `groups`), its MACs, and the
fraction of the kernel's energy it keeps, given as per-group "singular values" `s` whose squared
cumulative sums are the kept energies. Per method:

* "tai" (`SepConv2d`, Tai et al.): K intermediate channels; `s` the singular values of Tai et al.'s
  matrices, exact (Eckart-Young).
* "separable_basis" (`SeparableBasisConv2d`, Jaderberg et al.'s scheme 1): K = C*M for M basis filters
  per input channel, so `groups` = C and `s` per input channel the square roots of the sorted separable
  pair energies; exact (the squared error is the dropped energy).
* "tucker2" (`Tucker2Conv2d`): K per group gives R1 = min(K, C) and R2 = min(K, N) (per group); the kept
  energy is the HOSVD guarantee 1 - (tail_C(K) + tail_N(K)) / total, a lower bound on the true one.
  MACs are quadratic in K.
* "cp" (`CPConv2d`): K = R; kept energies come from CP-ALS fits (bisection for the energy rule, a fit
  per power-of-two rank, linearly interpolated, for the MAC budget); explicit ranks and MAC reductions
  need no fit before the layer's own.

1x1 convolutions and linear layers have only one low-rank form (a truncated SVD), so every method
uses "tai" (SVD) for them and the report says so."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import LowRankLinear, SepConv2d
from .rank_selection import LayerSpectrum, _conv_geometry, macs
from .schemes import (
    CPConv2d,
    SeparableBasisConv2d,
    Tucker2Conv2d,
    _cp_max_rank,
    _grouped,
    _unfold,
    cp_als,
    separable_basis_spectrum,
)

METHODS = ("tai", "separable_basis", "cp", "tucker2")

__all__ = ["METHODS", "effective_method", "method_spectrum", "build_layer", "kept_energy_of"]


def effective_method(method: str, layer: nn.Module) -> str:
    """The method a layer actually gets: "tai" (an SVD) for linear layers and 1x1 convolutions."""
    if isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1):
        return "tai"
    return method


def _geometry(layer: nn.Conv2d, input_shape: Sequence[int] | None) -> tuple[int, int, int, int, int]:
    """(H, W, H', W', Wt) of the conv on `input_shape`, all 1 without one (per output position)."""
    if input_shape is None:
        return 1, 1, 1, 1, 1
    h_out, w_out, w_t = _conv_geometry(layer, input_shape)
    return input_shape[-2], input_shape[-1], h_out, w_out, w_t


@dataclass
class MethodSpectrum(LayerSpectrum):
    """A LayerSpectrum whose MACs need not be linear in the rank (`macs_of`), for one method."""

    method: str = "tai"
    macs_of: object = None  # callable total rank -> MACs per sample; None: linear (rank * macs_per_rank)
    extra: dict = field(default_factory=dict)

    def lowrank_macs(self, rank: int) -> float:
        return rank * self.macs_per_rank if self.macs_of is None else float(self.macs_of(rank))

    def largest_rank_within(self, limit: float) -> int:
        if self.macs_of is None:
            return super().largest_rank_within(limit)
        best = 0
        for k in range(self.groups, self.full_rank + 1, self.groups):
            if self.lowrank_macs(k) > limit:
                break
            best = k
        return best

    @property
    def max_useful_rank(self) -> int:
        if self.macs_of is None:
            return super().max_useful_rank
        best = 0
        for k in range(self.groups, self.full_rank + 1, self.groups):
            if not self.lowrank_macs(k) < self.dense_macs:
                break
            best = k
        return best


def method_spectrum(
    method: str,
    name: str,
    layer: nn.Module,
    input_shape: Sequence[int] | None,
    svd=None,
    *,
    need_energies: bool = True,
) -> LayerSpectrum:
    """The spectrum of `layer` for `method` (see the module docstring); `method` must be effective."""
    if method == "tai":
        return LayerSpectrum.of(name, layer, input_shape, svd)
    g, (dv, dh) = layer.groups, layer.kernel_size
    c, n = layer.in_channels, layer.out_channels
    h, w, h_out, w_out, w_t = _geometry(layer, input_shape)
    dense = float(macs(layer, input_shape))
    if method == "separable_basis":
        ws = layer.weight.detach().reshape(g, n // g, c // g, dv, dh)
        energies = torch.cat([separable_basis_spectrum(ws[i])[3] for i in range(g)])  # (C, dv*dh)
        per_rank = dv * h_out * w_t + dh * h_out * w_out + (n / g) * h_out * w_out
        return MethodSpectrum(name, c, energies.clamp_min(0).sqrt(), dense, per_rank, method=method)
    if method == "tucker2":
        wg = _grouped(layer.weight, g)
        s_out = torch.linalg.svdvals(_unfold(wg, 0))  # (g, N/g)
        s_in = torch.linalg.svdvals(_unfold(wg, 1))  # (g, C/g)
        full = max(c // g, n // g)
        e_out = torch.zeros(g, full + 1, dtype=torch.float64)
        e_in = torch.zeros(g, full + 1, dtype=torch.float64)
        total = (s_out**2).sum(-1, keepdim=True)
        for e, s in ((e_out, s_out), (e_in, s_in)):
            tails = (s**2).flip(-1).cumsum(-1).flip(-1)  # tails[:, k] = energy beyond rank k
            e[:, : tails.shape[1]] = tails
        kept = (total - e_out - e_in).clamp_min(0)  # (g, full + 1): HOSVD guarantee at rank k
        pseudo = (kept[:, 1:] - kept[:, :-1]).clamp_min(0).sqrt()

        def tucker_macs(k: int) -> float:
            kg = k // g
            r_in, r_out = min(kg, c // g) * g, min(kg, n // g) * g
            return (
                (c // g) * r_in * h * w
                + r_out * (r_in // g) * dv * dh * h_out * w_out
                + n * (r_out // g) * h_out * w_out
            )

        return MethodSpectrum(name, g, pseudo, dense, 0.0, method=method, macs_of=tucker_macs)
    if method == "cp":
        wg = _grouped(layer.weight, g)
        per_rank = (c / g) * h * w + dv * h_out * w_t + dh * h_out * w_out + (n / g) * h_out * w_out
        bound = _cp_max_rank(tuple(wg.shape[1:]))
        sp = MethodSpectrum(
            name, g, torch.zeros(1, bound, dtype=torch.float64), dense, per_rank, method=method, extra={"w": wg}
        )
        if need_energies:
            sp.s = _cp_pseudo_spectrum(wg, max(1, sp.max_useful_rank // g))
        return sp
    raise ValueError(f"unknown method {method!r}")


def _cp_fit_kept(wg: torch.Tensor, r: int) -> float:
    """Fraction of the squared norm kept by per-group rank-r CP-ALS fits (summed over the groups)."""
    total = float((wg**2).sum())
    if total == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lost = sum(cp_als(wg[i], r)[1] ** 2 * float((wg[i] ** 2).sum()) for i in range(wg.shape[0]))
    return 1 - lost / total


def _cp_pseudo_spectrum(wg: torch.Tensor, r_max: int) -> torch.Tensor:
    """(1, bound) pseudo singular values: kept energies fitted at ranks 1, 2, 4, ... r_max, interpolated
    linearly in between (and kept flat after r_max, where only more MACs than dense lie)."""
    bound = _cp_max_rank(tuple(wg.shape[1:]))
    ranks = sorted({min(2**i, r_max) for i in range(int(math.log2(r_max)) + 2)})
    kept = [0.0]
    xs = [0]
    for r in ranks:
        kept.append(max(kept[-1], _cp_fit_kept(wg, r)))  # monotone despite ALS's local optima
        xs.append(r)
    curve = torch.tensor([_interp(xs, kept, k) for k in range(bound + 1)], dtype=torch.float64)
    total = float((wg**2).sum())
    return ((curve[1:] - curve[:-1]).clamp_min(0) * total).sqrt().unsqueeze(0)


def _interp(xs: list[int], ys: list[float], x: int) -> float:
    if x >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def cp_rank_for_energy(sp: MethodSpectrum, energy: float) -> int | None:
    """Smallest per-group CP rank (bisection on ALS fits) keeping `energy` in every group, as a total
    rank; None when that needs at least the dense layer's MACs."""
    wg = sp.extra["w"]
    top = sp.max_useful_rank // sp.groups
    if top < 1:
        return None
    worst = 1
    for i in range(wg.shape[0]):
        lo, hi, best = 1, top, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if _cp_fit_kept(wg[i : i + 1], mid) >= energy - 1e-12:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        if best is None:
            return None
        worst = max(worst, best)
    return worst * sp.groups


def build_layer(method: str, layer: nn.Module, k: int, svd=None) -> nn.Module:
    """The low-rank replacement of `layer` by `method` at total rank `k` (see the module docstring)."""
    if method == "tai":
        build = SepConv2d._from_svd if isinstance(layer, nn.Conv2d) else LowRankLinear._from_svd
        return build(layer, k, svd)
    if method == "separable_basis":
        return SeparableBasisConv2d.from_conv(layer, rank=max(1, k // layer.in_channels))
    if method == "cp":
        return CPConv2d.from_conv(layer, rank=k)
    if method == "tucker2":
        g = layer.groups
        kg = k // g
        return Tucker2Conv2d.from_conv(
            layer, rank=(min(kg, layer.in_channels // g) * g, min(kg, layer.out_channels // g) * g)
        )
    raise ValueError(f"unknown method {method!r}")


def kept_energy_of(layer: nn.Conv2d, new: nn.Module) -> float:
    """Fraction of the kernel's squared norm kept by `new`, 1 - ||W - W_new||^2 / ||W||^2 (1.0 for a zero kernel)."""
    w = layer.weight.detach().to(torch.float64)
    total = float((w**2).sum())
    if total == 0:
        return 1.0
    with torch.no_grad():
        err = float(((new.dense_weight().detach().to(torch.float64) - w) ** 2).sum())
    return 1 - err / total
