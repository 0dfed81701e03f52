"""CPConv2d, SeparableBasisConv2d, Tucker2Conv2d and vbmf_rank: each decomposition against what its
method promises (TensorLy's CP-ALS, HOSVD/HOOI optimality, per-channel Parseval), the layers' forward
against a float64 conv with their dense kernel, bad input and gradients."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels import CPConv2d, SeparableBasisConv2d, Tucker2Conv2d, vbmf_rank
from lowrank_kernels.schemes import _mttkrp, cp_als, set_fused

from tolerances import assert_within, sum_bound

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import parafac, partial_tucker  # noqa: E402

torch.manual_seed(0)

CONFIGS = [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=5, out_channels=7, kernel_size=(3, 5), padding=(1, 2), stride=(2, 1)),
    dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, stride=2, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=(4, 2), padding="same", bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=(2, 1), padding_mode="circular", groups=2),
]


def _builders(g):
    return {
        "cp": lambda conv: CPConv2d.from_conv(conv, rank=3 * g),
        "separable_basis": lambda conv: SeparableBasisConv2d.from_conv(conv, rank=2),
        "tucker2": lambda conv: Tucker2Conv2d.from_conv(conv, rank=(2 * g, 3 * g)),
    }


def _chain_length(layer) -> int:
    """Total number of products along any output's chain of sums (all stages), plus the bias."""
    g, (dv, dh) = layer.groups, layer.kernel_size
    cg = layer.in_channels // g
    if isinstance(layer, CPConv2d):
        return cg + dv + dh + layer.rank // g + 1
    if isinstance(layer, SeparableBasisConv2d):
        return dv + dh + cg * layer.rank + 1
    r_in, r_out = layer.rank
    return cg + r_in // g * dv * dh + r_out // g + 1


def _dense_conv(layer, x64):
    """The float64 conv with the layer's own dense kernel (and padding mode)."""
    w = layer.dense_weight().detach().double()
    b = None if layer.bias is None else layer.bias.detach().double()
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        b is not None,
        layer.padding_mode,
    ).double()
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
        return conv(x64)


@pytest.mark.filterwarnings("ignore:CPConv2d.from_conv. CP-ALS did not converge")
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("method", ["cp", "separable_basis", "tucker2"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain_convs"])
def test_forward_matches_dense_weight(cfg, method, layout, fused):
    """Both ways of running the depthwise pair (sep_conv, or two depthwise convolutions: set_fused)."""
    conv = nn.Conv2d(**cfg)
    layer = set_fused(_builders(cfg.get("groups", 1))[method](conv), fused)
    assert layer.fused is fused
    x = torch.randn(2, cfg["in_channels"], 11, 10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = layer(x)
    expected = _dense_conv(layer, x.double())
    # Magnitude: the same chain on absolute values in float64.
    absolute = copy.deepcopy(layer).double()
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
        mag = absolute(x.double().abs())
    assert_within(y, expected, sum_bound(mag, _chain_length(layer), torch.float32), f"{method} forward")
    assert layer.dense_weight().shape == conv.weight.shape


# --------------------------------------------------------------------------- CP


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_cp_matches_tensorly_parafac():
    """Same tensor, same TensorLy CP-ALS: the layer's kernel is TensorLy's reconstruction."""
    conv = nn.Conv2d(6, 8, 3).double()
    layer = CPConv2d.from_conv(conv, rank=5, n_iter_max=200, tol=1e-10)
    w = conv.weight.detach().numpy()
    norm = float((w**2).sum()) ** 0.5
    with tl.backend_context("numpy"):
        cp = parafac(
            tl.tensor(w / norm), 5, n_iter_max=200, init="svd", tol=1e-10, random_state=0, normalize_factors=True
        )
        ref = torch.from_numpy(tl.cp_to_tensor(cp)) * norm
    err = (layer.dense_weight().detach() - ref).norm() / ref.norm()
    assert err < 1e3 * torch.finfo(torch.float64).eps, err


def test_cp_recovers_an_exact_cp_kernel():
    g, r = 2, 3
    factors = [torch.randn(g, s, r, dtype=torch.float64) for s in (5, 4, 3, 3)]
    w = torch.einsum("gnr,gcr,gyr,gxr->gncyx", *factors).reshape(10, 4, 3, 3)
    conv = nn.Conv2d(8, 10, 3, groups=g).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = CPConv2d.from_conv(conv, rank=g * r, tol=1e-14, n_iter_max=5000)
    assert (layer.dense_weight() - w).norm() / w.norm() < 1e-6
    assert layer.fit_error < 1e-6


def test_cp_energy_rule_reaches_the_energy():
    g, r = 1, 2
    factors = [torch.randn(s, r, dtype=torch.float64) for s in (6, 5, 3, 3)]
    w = torch.einsum("nr,cr,yr,xr->ncyx", *factors) + 1e-3 * torch.randn(6, 5, 3, 3, dtype=torch.float64)
    conv = nn.Conv2d(5, 6, 3).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer = CPConv2d.from_conv(conv, energy=0.999)
    assert 1 - layer.fit_error**2 >= 0.999 - 1e-12
    assert layer.rank <= 2 * g  # rank 2 already explains all but the noise


def test_cp_no_convergence_warns_with_the_error_and_stays_finite():
    conv = nn.Conv2d(8, 8, 3)
    with pytest.warns(RuntimeWarning, match="did not converge.*relative error"):
        layer = CPConv2d.from_conv(conv, rank=6, n_iter_max=2)
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert 0 < layer.fit_error < 1


def test_cp_als_zero_tensor():
    factors, err, ok = cp_als(torch.zeros(3, 4, 2), 2)
    assert ok and err == 0.0 and all((f == 0).all() for f in factors)


# --------------------------------------------------------------------------- Jaderberg scheme 1


def _per_channel_hosvd_energies(weight):
    """Independent per-channel check: with V, H from torch's SVD of each channel's unfoldings, the sorted
    pair energies of the coordinates V^T W[n, c] H."""
    out = []
    for c in range(weight.shape[1]):
        f = weight[:, c].double()  # (N, dv, dh)
        n, dv, dh = f.shape
        V = torch.linalg.svd(f.permute(1, 0, 2).reshape(dv, -1))[0]
        H = torch.linalg.svd(f.permute(2, 0, 1).reshape(dh, -1))[0]
        G = V.T @ f @ H
        out.append((G**2).sum(0).flatten().sort(descending=True).values)
    return torch.stack(out)


@pytest.mark.parametrize("m", [1, 2, 4, 9])
def test_separable_basis_error_is_the_dropped_energy(m):
    conv = nn.Conv2d(5, 7, 3).double()
    layer = SeparableBasisConv2d.from_conv(conv, rank=m)
    w = conv.weight.detach()
    energies = _per_channel_hosvd_energies(w)
    dropped = float(energies[:, m:].sum())
    err2 = float(((layer.dense_weight().detach() - w) ** 2).sum())
    assert abs(err2 - dropped) <= 1e3 * torch.finfo(torch.float64).eps * float((w**2).sum())
    # Eckart-Young per channel: no M filters (separable or not) can do better than the rank-M SVD of the
    # channel's (N, dv*dh) filter matrix.
    for c in range(5):
        s = torch.linalg.svdvals(w[:, c].reshape(7, -1))
        err_c = float(((layer.dense_weight().detach()[:, c] - w[:, c]) ** 2).sum())
        assert err_c >= float((s[m:] ** 2).sum()) * (1 - 1e-9)
    if m == 9:
        assert err2 <= 1e3 * torch.finfo(torch.float64).eps * float((w**2).sum())


def test_separable_basis_bases_are_tensorly_partial_tucker_subspaces():
    """The per-channel bases span TensorLy's partial Tucker (HOSVD, modes dv and dh) subspaces."""
    conv = nn.Conv2d(3, 6, (3, 4)).double()
    layer = SeparableBasisConv2d.from_conv(conv, rank=12)  # all pairs: every basis vector is used
    w = conv.weight.detach()
    with tl.backend_context("numpy"):
        for c in range(3):
            (_, factors), _ = partial_tucker(w[:, c].numpy(), rank=[2, 3], modes=[1, 2], n_iter_max=0, init="svd")
            vs = layer.weight_v.detach()[c * 12 : (c + 1) * 12, 0, :, 0]  # (12, dv)
            for k, basis in ((0, vs), (1, layer.weight_h.detach()[c * 12 : (c + 1) * 12, 0, 0, :])):
                ref = torch.from_numpy(factors[k])  # leading vectors
                # each leading TensorLy vector appears (up to sign) among the layer's basis vectors
                overlap = (basis @ ref).abs().amax(0)
                assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-8), overlap


def test_separable_basis_energy_rule():
    conv = nn.Conv2d(4, 6, 3).double()
    energies = _per_channel_hosvd_energies(conv.weight.detach())
    layer = SeparableBasisConv2d.from_conv(conv, energy=0.8)
    kept = energies[:, : layer.rank].sum(1) / energies.sum(1)
    assert (kept >= 0.8 - 1e-12).all()
    if layer.rank > 1:
        assert not (energies[:, : layer.rank - 1].sum(1) / energies.sum(1) >= 0.8).all()


# --------------------------------------------------------------------------- Tucker-2


def _projector(u):
    return u @ u.transpose(-1, -2)


@pytest.mark.parametrize("groups", [1, 2])
def test_tucker2_hosvd_optimality(groups):
    conv = nn.Conv2d(8, 10, 3, groups=groups).double()
    r_in, r_out = 3 * groups, 4 * groups
    layer = Tucker2Conv2d.from_conv(conv, rank=(r_in, r_out))
    w = conv.weight.detach().reshape(groups, 10 // groups, 8 // groups, 3, 3)
    total = float((w**2).sum())
    tails = 0.0
    for g in range(groups):
        wg = w[g]
        # The factors are the leading singular vectors of the unfoldings (compared as subspaces).
        u0, s0, _ = torch.linalg.svd(wg.reshape(wg.shape[0], -1), full_matrices=False)
        u1, s1, _ = torch.linalg.svd(wg.transpose(0, 1).reshape(wg.shape[1], -1), full_matrices=False)
        a = layer.weight_out.detach().reshape(groups, 10 // groups, r_out // groups)[g]
        b = layer.weight_in.detach().reshape(groups, r_in // groups, 8 // groups)[g].T
        assert torch.allclose(_projector(a), _projector(u0[:, : r_out // groups]), atol=1e-10)
        assert torch.allclose(_projector(b), _projector(u1[:, : r_in // groups]), atol=1e-10)
        tails += float((s0[r_out // groups :] ** 2).sum() + (s1[r_in // groups :] ** 2).sum())
    err2 = float(((layer.dense_weight() - conv.weight) ** 2).sum())
    core2 = float((layer.weight_core.detach() ** 2).sum())
    eps = 1e3 * torch.finfo(torch.float64).eps * total
    assert abs(err2 - (total - core2)) <= eps  # orthonormal factors: error = norm^2 - core norm^2
    assert err2 <= tails + eps  # HOSVD bound: at most the discarded energies of both unfoldings
    hooi = Tucker2Conv2d.from_conv(conv, rank=(r_in, r_out), hooi_iters=10)
    assert float(((hooi.dense_weight() - conv.weight) ** 2).sum()) <= err2 + eps


def test_tucker2_matches_tensorly_partial_tucker_hosvd():
    conv = nn.Conv2d(6, 7, 3).double()
    layer = Tucker2Conv2d.from_conv(conv, rank=(3, 4))
    with tl.backend_context("numpy"):
        (core, factors), _ = partial_tucker(
            conv.weight.detach().numpy(), rank=[4, 3], modes=[0, 1], n_iter_max=0, init="svd"
        )
    u_out, u_in = (torch.from_numpy(f) for f in factors)
    ref = torch.einsum("nr,cs,rsyx->ncyx", u_out, u_in, torch.from_numpy(core))
    assert torch.allclose(layer.dense_weight().detach(), ref, atol=1e-10)


def test_tucker2_energy_and_full_rank():
    conv = nn.Conv2d(4, 5, 3).double()
    full = Tucker2Conv2d.from_conv(conv, rank=(4, 5))
    assert (full.dense_weight() - conv.weight).norm() <= 1e-12 * conv.weight.norm()
    layer = Tucker2Conv2d.from_conv(conv, energy=0.7)
    err2 = float(((layer.dense_weight() - conv.weight) ** 2).sum())
    assert err2 <= 2 * (1 - 0.7) * float((conv.weight**2).sum()) * (1 + 1e-9)


def test_vbmf_finds_the_true_rank():
    gen = torch.Generator().manual_seed(1)
    for rows, cols, rank in ((40, 60, 4), (60, 30, 7), (50, 50, 1)):
        signal = torch.randn(rows, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            rank, cols, generator=gen, dtype=torch.float64
        )
        noisy = 2.0 * signal + 0.5 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        est, sigma2 = vbmf_rank(noisy)
        assert est == rank, (rows, cols, rank, est)
        assert 0.5 * 0.25 < sigma2 < 2 * 0.25  # the noise variance is recovered to within a factor 2
    assert vbmf_rank(torch.randn(30, 40, generator=gen, dtype=torch.float64))[0] == 0  # pure noise


def test_tucker2_vbmf_rank():
    gen = torch.Generator().manual_seed(2)
    u_out = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    u_in = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    core = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    w = torch.einsum("nr,cs,rsyx->ncyx", u_out, u_in, core) + 0.01 * torch.randn(16, 12, 3, 3, generator=gen)
    conv = nn.Conv2d(12, 16, 3).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = Tucker2Conv2d.from_conv(conv, rank="vbmf")
    assert layer.rank == (2, 3)


# --------------------------------------------------------------------------- bad input and gradients


def test_bad_input():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="exceeds the CP rank bound"):
        CPConv2d.from_conv(conv, rank=10_000)
    with pytest.raises(ValueError, match="exceeds dv.dh"):
        SeparableBasisConv2d.from_conv(conv, rank=10)
    with pytest.raises(ValueError, match="R1 .input side. = 5 exceeds"):
        Tucker2Conv2d.from_conv(conv, rank=(5, 2))
    with pytest.raises(ValueError, match="rank must be an int, a pair or 'vbmf'"):
        Tucker2Conv2d.from_conv(conv, rank="auto")
    with pytest.raises(ValueError, match="exactly one of rank= or energy="):
        Tucker2Conv2d.from_conv(conv)
    with pytest.raises(ValueError, match="expects an nn.Conv2d"):
        CPConv2d.from_conv(nn.Linear(3, 3), rank=1)
    grouped = nn.Conv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match="rank \\(3\\) must be a multiple of groups \\(2\\)"):
        CPConv2d.from_conv(grouped, rank=3)
    with pytest.raises(ValueError, match="must be a multiple of groups"):
        Tucker2Conv2d.from_conv(grouped, rank=(3, 4))
    with pytest.raises(ValueError, match="SeparableBasisConv2d: in_channels"):
        SeparableBasisConv2d(5, 6, 3, rank=1, groups=2)
    with pytest.raises(ValueError, match="energy must be a float"):
        SeparableBasisConv2d.from_conv(conv, energy=1.5)
    with pytest.raises(ValueError, match="padding_mode"):
        CPConv2d(4, 6, 3, rank=2, padding_mode="mirror")


@pytest.mark.filterwarnings("ignore:CPConv2d.from_conv. CP-ALS did not converge")
@pytest.mark.parametrize("method", ["cp", "separable_basis", "tucker2"])
def test_gradients_flow(method):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = _builders(1)[method](conv)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_set_fused_rejects_a_non_bool():
    layer = SeparableBasisConv2d(4, 6, 3, rank=2)
    with pytest.raises(ValueError, match="fused must be a bool"):
        set_fused(layer, 0)
    assert set_fused(nn.Sequential(layer), False)[0].fused is False


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (5, 4, 7), (3, 1, 2, 5), (2, 3, 4, 5, 3)])
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_mttkrp_matches_tensorly_khatri_rao_product(shape, as_torch):
    """The Khatri-Rao-free MTTKRP CP-ALS runs on equals TensorLy's explicit one, every mode, also when
    repeated calls reuse the cached product and after an in-place change of a factor."""
    from tensorly.tenalg.core_tenalg.mttkrp import unfolding_dot_khatri_rao

    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    factors = [torch.randn(s, 4, dtype=torch.float64, generator=g) for s in shape]
    weights = torch.randn(4, dtype=torch.float64, generator=g)

    def check():
        for mode in range(len(shape)):
            with tl.backend_context("numpy"):
                ref = unfolding_dot_khatri_rao(x.numpy(), (weights.numpy(), [f.numpy() for f in factors]), mode)
            args = (x, (weights, factors)) if as_torch else (x.numpy(), (weights.numpy(), [f.numpy() for f in factors]))
            got = torch.as_tensor(_mttkrp(*args, mode))
            # Sums of prod(other sizes) products of len(shape) factors: float64 rounding only.
            bound = 4 * len(x.flatten()) * torch.finfo(torch.float64).eps * torch.from_numpy(abs(ref)).max()
            assert (got - torch.from_numpy(ref)).abs().max() <= bound, (shape, mode)

    check()
    check()
    factors[0].mul_(-2.0)  # in place: the cached product must not be reused
    check()


def test_cp_als_leaves_tensorly_backends_as_they_were():
    before = (tl.get_backend(), tl.tenalg.get_backend())
    cp_als(torch.randn(4, 5, 3, 3), 3)
    assert (tl.get_backend(), tl.tenalg.get_backend()) == before
