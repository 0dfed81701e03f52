"""Rank selection for low-rank layers, and the one place that counts their MACs.

Rules (each returns a total rank K, or None to leave the layer dense):
  * explicit rank;
  * energy: smallest rank keeping a fraction of the squared singular values;
  * reduction: a per-layer MAC reduction target (largest rank with MACs <= dense / target);
  * MAC budget: per-layer ranks maximising the product of the layers' kept-energy fractions under
    a total MAC budget (a dynamic program over discretized MACs, like MXNet accnn's selection);
  * every rule leaves a layer dense when its low-rank form would cost at least as many MACs, and
    `measure_speedup` lets `compress` also leave it dense when it is not faster on this machine.

`soft_threshold_singular_values_` is a training-time regularizer (proximal soft-thresholding of
singular values, as in singular value thresholding, Cai, Candes and Shen 2010): a proximal step
for a nuclear-norm penalty on each layer's decomposition matrix, which drives small singular
values to exactly zero during training so that truncation afterwards loses little."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._conv_args import _as_int, _conv_out_size
from .benchmark.harness import time_interleaved
from .layers import (
    LowRankLinear,
    SepConv2d,
    _check_energy,
    _layer_matrices,
    _padding_sides,
    _rank_for_energy,
    _svd64,
    _tai_kernel,
)
from .schemes import CPConv2d, SeparableBasisConv2d, Tucker2Conv2d

__all__ = [
    "macs",
    "LayerSpectrum",
    "rank_for_energy",
    "rank_for_reduction",
    "ranks_for_budget",
    "measure_speedup",
    "soft_threshold_singular_values_",
]


# --------------------------------------------------------------------------- MAC counting


def _conv_geometry(layer: nn.Conv2d | SepConv2d, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H', W', Wt): output height/width, and the width the vertical factor of a SepConv2d runs over."""
    h, w = input_shape[-2], input_shape[-1]
    dv, dh = layer.kernel_size
    top, bottom, left, right = _padding_sides(layer.padding, layer.kernel_size, layer.stride, layer.dilation)
    h_out = _conv_out_size(h + top + bottom, dv, layer.stride[0], 0, layer.dilation[0])
    w_out = _conv_out_size(w + left + right, dh, layer.stride[1], 0, layer.dilation[1])
    # sep_conv pads horizontally only in its second stage; explicit F.pad widens the first one too.
    symmetric_zeros = layer.padding_mode == "zeros" and top == bottom and left == right
    return h_out, w_out, (w if symmetric_zeros else w + left + right)


def _sep_macs_per_rank(layer: nn.Conv2d | SepConv2d, input_shape: Sequence[int]) -> float:
    """MACs per sample per unit of total rank K of the separable form of `layer`."""
    h_out, w_out, w_t = _conv_geometry(layer, input_shape)
    g, (dv, dh) = layer.groups, layer.kernel_size
    return (layer.in_channels // g) * dv * h_out * w_t + (layer.out_channels / g) * dh * h_out * w_out


def _linear_positions(input_shape: Sequence[int]) -> int:
    return math.prod(input_shape[1:-1]) if len(input_shape) > 1 else 1


def macs(layer: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """Multiply-accumulates per sample (dimension 0 of `input_shape` is the batch) of a Conv2d,
    SepConv2d, Linear or LowRankLinear. Without `input_shape`, per output position (for convs:
    the parameter count without bias; a 1x1 spatial input)."""
    if isinstance(layer, (nn.Conv2d, SepConv2d)):
        h_out, w_out, w_t = (1, 1, 1) if input_shape is None else _conv_geometry(layer, input_shape)
        g, (dv, dh) = layer.groups, layer.kernel_size
        cg = layer.in_channels // g
        if isinstance(layer, nn.Conv2d):
            return layer.out_channels * cg * dv * dh * h_out * w_out
        k = layer.rank
        return k * cg * dv * h_out * w_t + layer.out_channels * (k // g) * dh * h_out * w_out
    if isinstance(layer, (CPConv2d, SeparableBasisConv2d, Tucker2Conv2d)):
        return _chain_macs(layer, input_shape)
    positions = 1 if input_shape is None else _linear_positions(input_shape)
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features * positions
    if isinstance(layer, LowRankLinear):
        return layer.rank * (layer.in_features + layer.out_features) * positions
    raise ValueError(f"macs: unsupported layer type {type(layer).__name__}")


def _chain_macs(layer: nn.Module, input_shape: Sequence[int] | None) -> int:
    """MACs of the chains of schemes.py: every stage's outputs times its taps."""
    if input_shape is None:
        h = w = h_out = w_out = w_t = 1
    else:
        h, w = input_shape[-2], input_shape[-1]
        h_out, w_out, w_t = _conv_geometry(layer, input_shape)
    g, (dv, dh) = layer.groups, layer.kernel_size
    c, n = layer.in_channels, layer.out_channels
    if isinstance(layer, CPConv2d):
        r = layer.rank
        return r * (c // g) * h * w + r * dv * h_out * w_t + r * dh * h_out * w_out + n * (r // g) * h_out * w_out
    if isinstance(layer, SeparableBasisConv2d):
        cm = c * layer.rank
        return cm * dv * h_out * w_t + cm * dh * h_out * w_out + n * (cm // g) * h_out * w_out
    r_in, r_out = layer.rank
    return r_in * (c // g) * h * w + r_out * (r_in // g) * dv * dh * h_out * w_out + n * (r_out // g) * h_out * w_out


def params(layer: nn.Module) -> int:
    """Number of parameters of a layer."""
    return sum(p.numel() for p in layer.parameters())


# --------------------------------------------------------------------------- spectra and rules


@dataclass
class LayerSpectrum:
    """What rank selection needs to know about one dense layer.

    `s` holds the per-group singular values (groups, r) of the layer's decomposition matrix;
    a total rank K (multiple of `groups`) costs `K * macs_per_rank` against `dense_macs`."""

    name: str
    groups: int
    s: torch.Tensor
    dense_macs: float
    macs_per_rank: float

    @classmethod
    def of(
        cls,
        name: str,
        layer: nn.Module,
        input_shape: Sequence[int] | None = None,
        svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> LayerSpectrum:
        svd = svd if svd is not None else _svd64(_layer_matrices(layer))
        if isinstance(layer, nn.Conv2d):
            if input_shape is not None:
                per_rank = _sep_macs_per_rank(layer, input_shape)
            else:  # per output position
                g, (dv, dh) = layer.groups, layer.kernel_size
                per_rank = (layer.in_channels // g) * dv + (layer.out_channels / g) * dh
            groups = layer.groups
        else:
            positions = 1 if input_shape is None else _linear_positions(input_shape)
            per_rank = float((layer.in_features + layer.out_features) * positions)
            groups = 1
        return cls(name, groups, svd[1], float(macs(layer, input_shape)), per_rank)

    @property
    def full_rank(self) -> int:
        """Largest total rank (groups x per-group matrix rank bound)."""
        return self.groups * self.s.shape[-1]

    def kept_energy(self, rank: int) -> float:
        """Fraction of the squared singular values kept at total rank `rank` (over all groups)."""
        e = self.s.to(torch.float64) ** 2
        total = float(e.sum())
        return 1.0 if total == 0 else float(e[:, : rank // self.groups].sum()) / total

    def lowrank_macs(self, rank: int) -> float:
        return rank * self.macs_per_rank

    def largest_rank_within(self, limit: float) -> int:
        """Largest total rank (before rounding to groups) whose MACs stay within `limit`."""
        return int(limit // self.macs_per_rank)

    @property
    def max_useful_rank(self) -> int:
        """Largest total rank that still costs fewer MACs than the dense layer (0 if none does)."""
        k = math.ceil(self.dense_macs / self.macs_per_rank) - 1  # largest k with k * per_rank < dense
        k = min(k, self.full_rank)
        return max(0, k // self.groups * self.groups)

    def worthwhile(self, rank: int) -> bool:
        return self.lowrank_macs(rank) < self.dense_macs


def _round_rank(spectrum: LayerSpectrum, rank: int) -> int:
    """Clamp a requested total rank to [groups, full_rank], rounded down to a multiple of groups."""
    g = spectrum.groups
    return max(g, min(rank, spectrum.full_rank) // g * g)


def rank_for_energy(spectrum: LayerSpectrum, energy: float) -> int | None:
    """Smallest total rank keeping `energy` of the squared singular values in every group, or
    None when that rank would not reduce MACs."""
    k = spectrum.groups * _rank_for_energy(spectrum.s, energy)
    return k if spectrum.worthwhile(k) else None


def rank_for_reduction(spectrum: LayerSpectrum, reduction: float) -> int | None:
    """Largest total rank with low-rank MACs <= dense MACs / `reduction` (at least one per
    group), or None when even that would not reduce MACs."""
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not reduction > 1.0:
        raise ValueError(f"reduction must be a number > 1 (dense MACs / low-rank MACs), got {reduction!r}")
    k = _round_rank(spectrum, spectrum.largest_rank_within(spectrum.dense_macs / reduction))
    return k if spectrum.worthwhile(k) else None


def rank_for_explicit(spectrum: LayerSpectrum, rank: int) -> int | None:
    """`rank` clamped to the layer (see `_round_rank`), or None when it would not reduce MACs."""
    k = _round_rank(spectrum, rank)
    return k if spectrum.worthwhile(k) else None


def ranks_for_budget(spectra: Sequence[LayerSpectrum], budget: float, *, resolution: int = 2000) -> list[int | None]:
    """Per-layer total ranks (None = dense) maximising the product of kept-energy fractions
    subject to sum(MACs) <= budget * sum(dense MACs).

    Exact dynamic program over MACs discretized into `resolution` steps of the budget (costs are
    rounded up, so the budget always holds). Raises ValueError if even rank 1 per group
    everywhere exceeds the budget."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"mac_budget must be a fraction in (0, 1] of the dense MACs, got {budget!r}")
    if not spectra:
        return []
    total_dense = sum(sp.dense_macs for sp in spectra)
    allowed = budget * total_dense
    unit = allowed / resolution
    tiny = math.log(torch.finfo(torch.float64).tiny)
    options: list[list[tuple[int, float, int | None]]] = []  # per layer: (cost units, log energy, rank)
    for sp in spectra:
        opts = [(math.ceil(sp.dense_macs / unit - 1e-9), 0.0, None)]
        e = (sp.s.to(torch.float64) ** 2).sum(0)  # per-group energies summed across groups, by index
        total = float(e.sum())
        kept = (e.cumsum(0) / total if total > 0 else torch.ones_like(e)).clamp_min(math.exp(tiny)).tolist()
        for k in range(sp.groups, sp.max_useful_rank + 1, sp.groups):
            opts.append((math.ceil(sp.lowrank_macs(k) / unit - 1e-9), max(math.log(kept[k // sp.groups - 1]), tiny), k))
        options.append(opts)
    neg = -math.inf
    best = torch.zeros(resolution + 1, dtype=torch.float64)  # best value with cost <= b
    choices = []
    for opts in options:
        new = torch.full_like(best, neg)
        choice = torch.zeros(resolution + 1, dtype=torch.int32)
        for idx, (cost, gain, _) in enumerate(opts):
            if cost > resolution:
                continue
            cand = torch.full_like(best, neg)
            cand[cost:] = best[: resolution + 1 - cost] + gain
            better = cand > new
            new[better] = cand[better]
            choice[better] = idx
        best = new
        choices.append(choice)
    if best[resolution] == neg:
        minimum = sum(min(sp.lowrank_macs(sp.groups), sp.dense_macs) for sp in spectra) / total_dense
        raise ValueError(f"mac_budget={budget} is infeasible: the smallest ranks need {minimum:.4f} of the dense MACs")
    ranks: list[int | None] = [None] * len(spectra)
    b = resolution
    for i in reversed(range(len(spectra))):
        cost, _, k = options[i][int(choices[i][b])]
        ranks[i] = k
        b -= cost
    return ranks


# --------------------------------------------------------------------------- speed


def measure_speedup(
    dense: nn.Module, lowrank: nn.Module, input: torch.Tensor, *, rounds: int = 10, min_round_s: float = 0.02
) -> float:
    """Dense time / low-rank time of one forward on `input`, timed interleaved (inference mode)."""

    def run(layer: nn.Module):
        def call():
            with torch.inference_mode():
                layer(input)

        return call

    t = time_interleaved(
        {"dense": run(dense), "lowrank": run(lowrank)},
        rounds=rounds,
        min_round_s=min_round_s,
        device=input.device.type,  # on a GPU the harness synchronizes around each call
    )
    return t["dense"].median_ms / t["lowrank"].median_ms


# --------------------------------------------------------------------------- training-time regularizer


def soft_threshold_singular_values_(
    model: nn.Module, threshold: float, *, layers: Iterable[str] | None = None
) -> dict[str, int]:
    """Soft-threshold the singular values of every Conv2d/Linear weight in place (proximal step).

    Each weight's decomposition matrix (Tai et al.'s per-group matrix for convs, the weight
    itself for linears) becomes U max(S - threshold, 0) V^T. Called after each optimizer step
    with threshold = learning_rate * lambda, this is the proximal gradient method for the loss
    plus lambda * sum of nuclear norms, which drives ranks down before truncation.

    Returns each layer's numerical rank after the step (summed over groups).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    wanted = None if layers is None else set(layers)
    ranks = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if type(layer) not in (nn.Conv2d, nn.Linear) or (wanted is not None and name not in wanted):
                continue
            u, s, vh = _svd64(_layer_matrices(layer))
            s = (s - threshold).clamp_min(0)
            mats = (u * s.unsqueeze(1)) @ vh
            if isinstance(layer, nn.Conv2d):
                new = _tai_kernel(mats, layer.out_channels, layer.kernel_size)
            else:
                new = mats[0]
            layer.weight.copy_(new.to(layer.weight.dtype))
            # Numerical rank, as torch.linalg.matrix_rank counts it (rounding leaves tiny non-zeros).
            tol = s.amax(-1, keepdim=True) * max(mats.shape[-2:]) * torch.finfo(layer.weight.dtype).eps
            ranks[name] = int((s > tol).sum())
    return ranks


def _check_rule_args(rank, energy, reduction, mac_budget) -> str:
    """Exactly one rule must be chosen; returns its name after validating its value."""
    given = {
        k: v
        for k, v in (("rank", rank), ("energy", energy), ("reduction", reduction), ("mac_budget", mac_budget))
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank=, energy=, reduction=, mac_budget= (got {sorted(given) or 'none'})")
    ((name, value),) = given.items()
    if name == "rank" and (_as_int(value) is None or _as_int(value) <= 0):
        raise ValueError(f"rank must be a positive int, got {value!r}")
    if name == "energy":
        _check_energy(value)
    if name == "reduction" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1):
        raise ValueError(f"reduction must be a number > 1 (dense MACs / low-rank MACs), got {value!r}")
    if name == "mac_budget" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
        raise ValueError(f"mac_budget must be a fraction in (0, 1] of the dense MACs, got {value!r}")
    return name
