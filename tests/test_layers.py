"""SepConv2d / LowRankLinear: the closed-form decomposition against independent float64 math."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_kernels import LowRankLinear, SepConv2d
from lowrank_kernels._reference import sep_conv_reference

torch.manual_seed(0)


def tai_matrix_numpy(weight: torch.Tensor, groups: int, g: int) -> np.ndarray:
    """Tai et al.'s matrix of group g built entry by entry: M[(c, y), (x, n)] = W[n, c, y, x]."""
    w = weight.detach().double().numpy()
    n_total, cg, dv, dh = w.shape
    ng = n_total // groups
    m = np.zeros((cg * dv, dh * ng))
    for n in range(ng):
        for c in range(cg):
            for y in range(dv):
                for x in range(dh):
                    m[c * dv + y, x * ng + n] = w[g * ng + n, c, y, x]
    return m


CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=5, out_channels=7, kernel_size=(3, 5), padding=(1, 2)),
    dict(in_channels=6, out_channels=4, kernel_size=(2, 3), stride=(2, 1), padding=1, dilation=(1, 2)),
    dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, stride=2, padding=2, dilation=2),
    dict(in_channels=4, out_channels=4, kernel_size=(1, 3), padding="same", bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=(4, 2), padding="same"),  # asymmetric 'same'
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=(2, 1), padding_mode="circular"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="replicate", groups=2),
    dict(in_channels=8, out_channels=12, kernel_size=1),
]


def make_conv(cfg) -> nn.Conv2d:
    return nn.Conv2d(**cfg).double()


def full_rank(conv: nn.Conv2d) -> int:
    g = conv.groups
    dv, dh = conv.kernel_size
    return g * min(conv.in_channels // g * dv, dh * conv.out_channels // g)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_full_rank_reproduces_conv(cfg):
    conv = make_conv(cfg)
    sep = SepConv2d.from_conv(conv, rank=full_rank(conv))
    x = torch.randn(2, conv.in_channels, 9, 11, dtype=torch.double)
    torch.testing.assert_close(sep(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sep.dense_weight(), conv.weight, rtol=1e-10, atol=1e-10)
    assert sep.weight_v.shape == (full_rank(conv), conv.in_channels // conv.groups, conv.kernel_size[0], 1)
    assert sep.weight_h.shape == (
        conv.out_channels,
        full_rank(conv) // conv.groups,
        1,
        conv.kernel_size[1],
    )
    assert (sep.bias is None) == (conv.bias is None)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_truncation_error_equals_tail_singular_values(cfg):
    conv = make_conv(cfg)
    g = conv.groups
    svals = [np.linalg.svd(tai_matrix_numpy(conv.weight, g, i), compute_uv=False) for i in range(g)]
    for k in range(1, full_rank(conv) // g + 1):
        sep = SepConv2d.from_conv(conv, rank=k * g)
        err = (sep.dense_weight() - conv.weight).detach()
        ng = conv.out_channels // g
        for i in range(g):
            group_err = err[i * ng : (i + 1) * ng].pow(2).sum().item()
            tail = float((svals[i][k:] ** 2).sum())
            assert group_err == pytest.approx(tail, rel=1e-8, abs=1e-12)
        # Eckart-Young: any other rank-k factorization (here: a perturbed one) does no better.
        wv = sep.weight_v.detach() + 1e-3 * torch.randn_like(sep.weight_v)
        other = SepConv2d(**{**cfg, "rank": k * g}).double()
        with torch.no_grad():
            other.weight_v.copy_(wv)
            other.weight_h.copy_(sep.weight_h)
        assert (other.dense_weight() - conv.weight).pow(2).sum() >= err.pow(2).sum()


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=str)
def test_forward_is_the_two_convolutions(cfg):
    conv = make_conv(cfg).float()
    sep = SepConv2d.from_conv(conv, rank=conv.groups)
    x = torch.randn(3, conv.in_channels, 10, 12)
    expected = sep_conv_reference(
        x, sep.weight_v, sep.weight_h, sep.bias, sep.stride, sep._op_padding, sep.dilation, sep.groups
    )
    torch.testing.assert_close(sep(x), expected, rtol=1e-4, atol=1e-5)


def test_bias_sits_on_horizontal_factor():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    sep = SepConv2d.from_conv(conv, rank=2)
    torch.testing.assert_close(sep.bias, conv.bias)
    x = torch.zeros(1, 3, 5, 5, dtype=torch.double)
    torch.testing.assert_close(sep(x), conv.bias.view(1, 4, 1, 1).expand(1, 4, 5, 5))


@pytest.mark.parametrize("energy", [0.3, 0.7, 0.9, 0.99, 1.0])
def test_energy_picks_smallest_sufficient_rank(energy):
    conv = nn.Conv2d(6, 8, 3, groups=2).double()
    sep = SepConv2d.from_conv(conv, energy=energy)
    per_group = []
    for i in range(2):
        e = np.linalg.svd(tai_matrix_numpy(conv.weight, 2, i), compute_uv=False) ** 2
        frac = np.cumsum(e) / e.sum()
        per_group.append(int(np.argmax(frac >= energy - 1e-12)) + 1)
    assert sep.rank == 2 * max(per_group)


def test_gradients_match_reference():
    conv = nn.Conv2d(4, 6, (3, 2), padding=(1, 0), stride=(1, 2)).double()
    sep = SepConv2d.from_conv(conv, rank=3)
    x = torch.randn(2, 4, 7, 9, dtype=torch.double, requires_grad=True)
    sep(x).square().sum().backward()
    grads = [x.grad, sep.weight_v.grad, sep.weight_h.grad, sep.bias.grad]
    x2 = x.detach().clone().requires_grad_()
    wv, wh, b = (p.detach().clone().requires_grad_() for p in (sep.weight_v, sep.weight_h, sep.bias))
    sep_conv_reference(x2, wv, wh, b, sep.stride, sep._op_padding, sep.dilation, 1).square().sum().backward()
    for got, want in zip(grads, [x2.grad, wv.grad, wh.grad, b.grad]):
        torch.testing.assert_close(got, want)


def test_low_rank_linear():
    lin = nn.Linear(9, 7).double()
    s = torch.linalg.svdvals(lin.weight.detach())
    x = torch.randn(4, 3, 9, dtype=torch.double)
    full = LowRankLinear.from_linear(lin, rank=7)
    torch.testing.assert_close(full(x), lin(x))
    for k in range(1, 8):
        low = LowRankLinear.from_linear(lin, rank=k)
        err = (low.dense_weight() - lin.weight).pow(2).sum().item()
        assert err == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-8, abs=1e-12)
        assert low.weight_in.shape == (k, 9) and low.weight_out.shape == (7, k)
    e = s**2
    k90 = int(torch.argmax((e.cumsum(0) / e.sum() >= 0.9).int())) + 1
    assert LowRankLinear.from_linear(lin, energy=0.9).rank == k90
    nobias = nn.Linear(5, 4, bias=False)
    assert LowRankLinear.from_linear(nobias, rank=2).bias is None


def test_new_layer_construction():
    layer = SepConv2d(4, 6, (3, 5), rank=4, stride=2, padding=1, groups=2)
    out = layer(torch.randn(1, 4, 12, 12))
    ref = F.conv2d(torch.randn(1, 4, 12, 12), torch.randn(6, 2, 3, 5), stride=2, padding=1, groups=2)
    assert out.shape == ref.shape
    assert "rank=4" in repr(layer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-2), "rank"),
        (dict(rank=3), "multiple of groups"),
        (dict(rank=1000), "full rank"),
        (dict(energy=0.0), "energy"),
        (dict(energy=1.5), "energy"),
        (dict(energy=-0.1), "energy"),
        (dict(), "exactly one"),
        (dict(rank=2, energy=0.5), "exactly one"),
    ],
)
def test_from_conv_bad_arguments(kwargs, match):
    conv = nn.Conv2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match=match):
        SepConv2d.from_conv(conv, **kwargs)


def test_bad_layers_and_options():
    with pytest.raises(ValueError, match="nn.Conv2d"):
        SepConv2d.from_conv(nn.Conv1d(3, 4, 3), rank=1)
    with pytest.raises(ValueError, match="nn.Conv2d"):
        SepConv2d.from_conv(nn.ConvTranspose2d(3, 4, 3), rank=1)
    with pytest.raises(ValueError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv2d(3, 4, 3), rank=1)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(nn.Linear(3, 4), rank=0)
    with pytest.raises(ValueError, match="padding_mode"):
        SepConv2d(4, 4, 3, rank=2, padding_mode="mirror")
    with pytest.raises(ValueError, match="divisible by groups"):
        SepConv2d(4, 6, 3, rank=3, groups=2)
    with pytest.raises(ValueError, match="same"):
        SepConv2d(4, 6, 3, rank=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding"):
        SepConv2d(4, 6, 3, rank=2, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        SepConv2d(4, 6, 3, rank=2, stride=0)


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 3),
    c_per_group=st.integers(1, 4),
    n_per_group=st.integers(1, 4),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    data=st.data(),
)
def test_fuzz_decomposition(groups, c_per_group, n_per_group, kernel, stride, padding, dilation, mode, data):
    conv = nn.Conv2d(
        groups * c_per_group,
        groups * n_per_group,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        padding_mode=mode,
    ).double()
    x = torch.randn(2, conv.in_channels, 9, 8, dtype=torch.double)
    full = full_rank(conv)
    torch.testing.assert_close(SepConv2d.from_conv(conv, rank=full)(x), conv(x), rtol=1e-9, atol=1e-9)
    k = data.draw(st.integers(1, full // groups))
    err = (SepConv2d.from_conv(conv, rank=k * groups).dense_weight() - conv.weight).pow(2).sum().item()
    tail = sum(
        float((np.linalg.svd(tai_matrix_numpy(conv.weight, groups, i), compute_uv=False)[k:] ** 2).sum())
        for i in range(groups)
    )
    assert err == pytest.approx(tail, rel=1e-8, abs=1e-12)


def test_decomposition_leaves_thread_settings_alone(monkeypatch):
    # Thread counts are the application's: decomposing layers must never change them.
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    conv = nn.Conv2d(8, 12, 3, padding=1)
    SepConv2d.from_conv(conv, rank=4)
    LowRankLinear.from_linear(nn.Linear(20, 10), energy=0.9)
    assert calls == []


def test_numpy_integer_sizes():
    # nn.Conv2d accepts numpy integers for its sizes; so do the low-rank layers.
    layer = SepConv2d(np.int64(6), np.int64(8), np.int64(3), rank=np.int32(4), padding=np.int64(1), groups=np.int64(2))
    assert (layer.in_channels, layer.out_channels, layer.rank, layer.groups) == (6, 8, 4, 2)
    assert all(type(v) is int for v in (layer.in_channels, layer.rank, *layer.kernel_size, *layer.stride))
    x = torch.randn(1, 6, 5, 5)
    assert layer(x).shape == (1, 8, 5, 5)
    conv = nn.Conv2d(np.int64(6), np.int64(8), np.int64(3))
    assert SepConv2d.from_conv(conv, rank=np.int64(4)).rank == 4
