"""Rank rules, MAC counting and the singular-value soft-threshold, against brute force / plain torch."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import LowRankLinear, SepConv2d
from lowrank_kernels._reference import sep_conv_reference
from lowrank_kernels.layers import _tai_matrices
from lowrank_kernels.rank_selection import (
    LayerSpectrum,
    macs,
    measure_speedup,
    rank_for_energy,
    rank_for_explicit,
    rank_for_reduction,
    ranks_for_budget,
    soft_threshold_singular_values_,
)

torch.manual_seed(0)


def counted_macs_conv(conv: nn.Conv2d, x: torch.Tensor) -> int:
    out = conv(x)
    return out[:1].numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def counted_macs_sep(sep: SepConv2d, x: torch.Tensor) -> int:
    """MACs of the two convolutions the layer stands for, from their actual output sizes."""
    if sep._explicit_pad is not None:
        x = F.pad(x, sep._explicit_pad, mode="constant" if sep.padding_mode == "zeros" else sep.padding_mode)
    s, p, d, g = sep.stride, sep._op_padding, sep.dilation, sep.groups
    t = F.conv2d(x[:1], sep.weight_v, None, (s[0], 1), (p[0], 0), (d[0], 1), g)
    out = sep_conv_reference(x[:1], sep.weight_v, sep.weight_h, None, s, p, d, g)
    cg, dv = sep.weight_v.shape[1], sep.weight_v.shape[2]
    kg, dh = sep.weight_h.shape[1], sep.weight_h.shape[3]
    return t.numel() * cg * dv + out.numel() * kg * dh


@pytest.mark.parametrize(
    "cfg",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(
            in_channels=6, out_channels=8, kernel_size=(3, 5), stride=(2, 3), padding=(0, 2), dilation=(2, 1), groups=2
        ),
        dict(in_channels=4, out_channels=6, kernel_size=(4, 2), padding="same", padding_mode="reflect"),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding="valid"),
    ],
    ids=str,
)
def test_macs_match_counted_convolutions(cfg):
    conv = nn.Conv2d(**cfg)
    x = torch.randn(3, conv.in_channels, 13, 11)
    assert macs(conv, x.shape) == counted_macs_conv(conv, x)
    sep = SepConv2d.from_conv(conv, rank=2 * conv.groups)
    assert macs(sep, x.shape) == counted_macs_sep(sep, x)
    spectrum = LayerSpectrum.of("c", conv, x.shape)
    assert spectrum.dense_macs == macs(conv, x.shape)
    assert spectrum.lowrank_macs(sep.rank) == pytest.approx(macs(sep, x.shape))


def test_macs_linear():
    lin = nn.Linear(10, 6)
    assert macs(lin, (4, 7, 10)) == 7 * 10 * 6
    assert macs(LowRankLinear.from_linear(lin, rank=3), (4, 7, 10)) == 7 * 3 * 16
    assert macs(lin) == 60
    with pytest.raises(ValueError, match="unsupported"):
        macs(nn.ReLU())


def lowrank_conv(n, c, k, rank, scale=1.0) -> nn.Conv2d:
    """A conv whose Tai matrix has exactly `rank` non-zero singular values."""
    conv = nn.Conv2d(c, n, k, padding=k // 2).double()
    m = torch.randn(c * k, rank, dtype=torch.double) @ torch.randn(rank, k * n, dtype=torch.double) * scale
    w = m.reshape(c, k, k, n).permute(3, 0, 1, 2)
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def test_energy_rule_and_dense_fallback():
    conv = lowrank_conv(16, 16, 3, rank=5)
    sp = LayerSpectrum.of("c", conv, (1, 16, 8, 8))
    assert rank_for_energy(sp, 1.0) == 5
    e = sp.s[0] ** 2
    frac = (e.cumsum(0) / e.sum()).numpy()
    assert rank_for_energy(sp, 0.8) == int(np.argmax(frac >= 0.8)) + 1
    dense_like = nn.Conv2d(3, 4, 1).double()  # full rank 3 = break-even is below it
    sp2 = LayerSpectrum.of("d", dense_like, (1, 3, 5, 5))
    assert sp2.max_useful_rank == 1  # 1 * (3 + 4) < 12, 2 * 7 >= 12
    assert rank_for_energy(sp2, 1.0) is None
    assert rank_for_explicit(sp2, 2) is None
    assert rank_for_explicit(sp2, 1) == 1


def test_explicit_rank_is_clamped_and_rounded_to_groups():
    conv = nn.Conv2d(8, 64, 3, groups=4, padding=1)
    sp = LayerSpectrum.of("g", conv, (1, 8, 6, 6))
    assert rank_for_explicit(sp, 7) == 4
    assert rank_for_explicit(sp, 1) == 4  # at least one per group
    # full rank 24 costs 24 * (2*3 + 16*3) = 1296 MACs per pixel > 1152 dense: not worthwhile
    assert sp.full_rank == 24 and sp.max_useful_rank == 20
    assert rank_for_explicit(sp, 10_000) is None
    assert rank_for_explicit(sp, 21) == 20


@pytest.mark.parametrize("reduction", [1.5, 2.0, 4.0, 10.0])
def test_reduction_rule(reduction):
    conv = nn.Conv2d(32, 48, 3, padding=1)
    shape = (1, 32, 10, 10)
    sp = LayerSpectrum.of("c", conv, shape)
    k = rank_for_reduction(sp, reduction)
    sep = SepConv2d.from_conv(conv, rank=k)
    assert macs(sep, shape) <= macs(conv, shape) / reduction
    bigger = SepConv2d(32, 48, 3, rank=k + 1, padding=1)
    assert macs(bigger, shape) > macs(conv, shape) / reduction or k == 1
    with pytest.raises(ValueError, match="reduction"):
        rank_for_reduction(sp, 1.0)


def brute_force_budget(spectra, budget):
    total = sum(sp.dense_macs for sp in spectra)
    options = []
    for sp in spectra:
        opts = [(sp.dense_macs, 0.0, None)]
        for k in range(sp.groups, sp.max_useful_rank + 1, sp.groups):
            opts.append((sp.lowrank_macs(k), math.log(sp.kept_energy(k)), k))
        options.append(opts)
    best, best_ranks = -math.inf, None
    for combo in itertools.product(*options):
        cost = sum(c for c, _, _ in combo)
        value = sum(v for _, v, _ in combo)
        if cost <= budget * total and value > best:
            best, best_ranks = value, [k for _, _, k in combo]
    return best, best_ranks


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7, 0.9])
def test_budget_matches_brute_force(budget):
    layers = [lowrank_conv(6, 4, 3, rank=4), nn.Conv2d(6, 8, 3, groups=2).double(), nn.Linear(20, 12).double()]
    shapes = [(1, 4, 6, 6), (1, 6, 6, 6), (1, 20)]
    spectra = [LayerSpectrum.of(str(i), layer, s) for i, (layer, s) in enumerate(zip(layers, shapes))]
    ranks = ranks_for_budget(spectra, budget, resolution=20000)
    cost = sum(sp.dense_macs if k is None else sp.lowrank_macs(k) for sp, k in zip(spectra, ranks))
    assert cost <= budget * sum(sp.dense_macs for sp in spectra)
    value = sum(0.0 if k is None else math.log(sp.kept_energy(k)) for sp, k in zip(spectra, ranks))
    best, _ = brute_force_budget(spectra, budget)
    # Costs are rounded up to 1/20000 of the budget, so the DP can only lose a sliver of the optimum.
    assert best - 1e-3 <= value <= best + 1e-12


def test_budget_infeasible_and_bad_values():
    spectra = [LayerSpectrum.of("a", nn.Conv2d(8, 8, 3), (1, 8, 6, 6))]
    with pytest.raises(ValueError, match="infeasible"):
        ranks_for_budget(spectra, 0.01)
    for bad in (0, 1.5, -1, True):
        with pytest.raises(ValueError, match="mac_budget"):
            ranks_for_budget(spectra, bad)


def test_soft_threshold_shrinks_singular_values():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6, 5)).double()
    conv, lin = model[0], model[2]
    s_conv = torch.linalg.svdvals(_tai_matrices(conv.weight.detach(), 2))
    s_lin = torch.linalg.svdvals(lin.weight.detach())
    tau = float(s_lin.median())
    w_lin = lin.weight.detach().clone()
    ranks = soft_threshold_singular_values_(model, tau)
    torch.testing.assert_close(
        torch.linalg.svdvals(_tai_matrices(conv.weight.detach(), 2)), (s_conv - tau).clamp_min(0), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        torch.linalg.svdvals(lin.weight.detach()), (s_lin - tau).clamp_min(0), atol=1e-10, rtol=0
    )
    assert ranks == {"0": int((s_conv > tau).sum()), "2": int((s_lin > tau).sum())}

    # It is the proximal point of tau * nuclear norm: no nearby matrix has a lower objective.
    def objective(x):
        return 0.5 * (x - w_lin).pow(2).sum() + tau * torch.linalg.matrix_norm(x, "nuc")

    x_star = lin.weight.detach()
    for _ in range(20):
        assert objective(x_star) <= objective(x_star + 1e-3 * torch.randn_like(x_star)) + 1e-12
    assert soft_threshold_singular_values_(model, 0.0, layers=["2"]) == {"2": ranks["2"]}
    with pytest.raises(ValueError, match="threshold"):
        soft_threshold_singular_values_(model, -1.0)


def test_measure_speedup_runs():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    sep = SepConv2d.from_conv(conv, rank=4)
    speed = measure_speedup(conv, sep, torch.randn(1, 8, 16, 16), rounds=2, min_round_s=0.0)
    assert math.isfinite(speed) and speed > 0


def test_measure_speedup_synchronizes_the_inputs_device(monkeypatch):
    # On a GPU, timing must wait for the kernels, not just their launches: the harness synchronizes
    # the input's device around every timed call (stubbed here, so no GPU is needed).
    events = []

    class Layer(nn.Module):
        def forward(self, x):
            events.append("call")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: events.append("sync"))
    gpu_input = SimpleNamespace(device=torch.device("cuda", 0))
    measure_speedup(Layer(), Layer(), gpu_input, rounds=2, min_round_s=0.0)
    timed = events[events.index("sync") :]  # after the warm-up
    assert timed.count("call") >= 4
    for i, event in enumerate(timed):
        if event == "call":
            assert timed[i - 1] == "sync" and timed[i + 1] == "sync", timed
