"""torch.ops.lowrank.sep_conv on CPU against the two-F.conv2d reference (docs/design.md)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_kernels as lk
from lowrank_kernels._reference import sep_conv_reference

# float32 accumulates C*dv + K*dh products of unit-variance values: relative 1e-5 of the
# output scale is a few ulps per term; float64 is held to near machine precision.
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def _make(B, C, H, W, K, N, dv, dh, groups, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    wv = torch.randn(K, C // groups, dv, 1, generator=g, dtype=dtype) / (C // groups * dv) ** 0.5
    wh = torch.randn(N, K // groups, 1, dh, generator=g, dtype=dtype) / (K // groups * dh) ** 0.5
    b = torch.randn(N, generator=g, dtype=dtype) if bias else None
    return x, wv, wh, b


def _assert_float32_grad_close(g, r, name):
    # A float32 gradient sums thousands of products with cancellation: its error is measured
    # against the gradient's scale (torch's own float32 convolutions stay within 2e-6 of it).
    torch.testing.assert_close(
        g, r.float(), rtol=1e-4, atol=4e-6 * float(r.abs().max()), msg=lambda m: f"grad {name}: {m}"
    )


def _reference64(x, wv, wh, b, *args):
    as64 = [t.double() if t is not None else None for t in (x, wv, wh, b)]
    return sep_conv_reference(*as64, *args)


SPLITS = [  # (stride, padding, dilation), each (vertical, horizontal)
    ((1, 1), (0, 0), (1, 1)),
    ((1, 1), (1, 2), (1, 1)),
    ((2, 1), (1, 0), (1, 1)),
    ((1, 2), (0, 1), (1, 1)),
    ((2, 3), (2, 1), (1, 2)),
    ((1, 1), (2, 2), (2, 1)),
    ((3, 2), (0, 3), (2, 3)),
]
KERNELS = [(1, 1), (3, 3), (3, 5), (5, 1), (1, 7), (7, 3)]


def _fits(height, split, dv):
    # Combinations whose dilated kernel is taller than the padded input are bad-input cases.
    return height + 2 * split[1][0] >= split[2][0] * (dv - 1) + 1


@pytest.mark.parametrize(
    "split,dvdh",
    [(s, k) for s in SPLITS for k in KERNELS if _fits(7, s, k[0])],
    ids=lambda v: f"dv{v[0]}dh{v[1]}" if isinstance(v[0], int) else f"s{v[0]}p{v[1]}d{v[2]}",
)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 stride 1 runs the AVX2 kernels
def test_forward_matches_reference(split, dvdh, groups, memory_format, dtype):
    stride, padding, dilation = split
    dv, dh = dvdh
    x, wv, wh, b = _make(2, 12, 7, 13, 8, 20, dv, dh, groups, True, dtype)
    x = x.contiguous(memory_format=memory_format)
    out = lk.sep_conv(x, wv, wh, b, stride, padding, dilation, groups)
    ref = _reference64(x, wv, wh, b, stride, padding, dilation, groups)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "shape",  # B, C, H, W, K, N, dv, dh, groups
    [
        (3, 5, 7, 13, 3, 11, 3, 3, 1),
        (1, 13, 9, 17, 6, 10, 5, 3, 1),
        (2, 8, 16, 16, 4, 12, 3, 1, 2),
        (1, 24, 30, 33, 12, 20, 3, 3, 4),
        (2, 3, 64, 70, 7, 9, 3, 3, 1),
    ],
)
def test_forward_dtypes_and_bias(dtype, bias, memory_format, shape):
    B, C, H, W, K, N, dv, dh, groups = shape
    x, wv, wh, b = _make(B, C, H, W, K, N, dv, dh, groups, bias, dtype)
    x = x.contiguous(memory_format=memory_format)
    args = ((1, 1), (dv // 2, dh // 2), (1, 1), groups)
    out = lk.sep_conv(x, wv, wh, b, *args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, _reference64(x, wv, wh, b, *args).to(dtype), **TOL[dtype])


def test_conv_style_arguments():
    x, wv, wh, b = _make(1, 4, 9, 11, 4, 6, 3, 3, 2, True)
    out = lk.sep_conv(x, wv, wh, b, stride=2, padding=1, dilation=(2, 1), groups=2)
    ref = sep_conv_reference(x, wv, wh, b, (2, 2), (1, 1), (2, 1), 2)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    op = torch.ops.lowrank.sep_conv(x, wv, wh, b, [2, 2], [1, 1], [2, 1], 2)
    torch.testing.assert_close(op, ref, **TOL[torch.float64])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_batch_zero(memory_format):
    x, wv, wh, b = _make(0, 6, 7, 13, 4, 8, 3, 3, 1, True)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    out = lk.sep_conv(x, wv, wh, b, 1, 1)
    assert out.shape == (0, 8, 7, 13)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_views():
    base, wv, wh, b = _make(4, 10, 14, 30, 6, 8, 3, 5, 1, True)
    for x in (base[::2, 2:8], base[:, :6, 1::2, ::3], base.transpose(2, 3)[:, :6], base[..., 3:20][:, 4:]):
        w_v = wv[:, : x.shape[1]]
        out = lk.sep_conv(x, w_v, wh, b, (1, 2), (1, 2))
        torch.testing.assert_close(out, sep_conv_reference(x, w_v, wh, b, (1, 2), (1, 2)), **TOL[torch.float64])
    # Non-contiguous weights and bias too.
    wv_t = torch.randn(10, 6, 3, 1, dtype=torch.float64).transpose(0, 1)
    assert not wv_t.is_contiguous()
    x = base[:, :10]
    b_view = torch.randn(16, dtype=torch.float64)[::2]
    out = lk.sep_conv(x, wv_t, wh, b_view, 1, 1)
    torch.testing.assert_close(out, sep_conv_reference(x, wv_t, wh, b_view, (1, 1), (1, 1)), **TOL[torch.float64])


def test_reduced_precision_inputs_compute_in_float32():
    x, wv, wh, b = _make(2, 8, 9, 10, 4, 6, 3, 3, 1, True, torch.float32)
    args = ((1, 1), (1, 1), (1, 1), 1)
    ref = _reference64(x, wv, wh, b, *args).float()
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        out = lk.sep_conv(x.to(dtype), wv.to(dtype), wh.to(dtype), b.to(dtype), *args)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


# --- backward -------------------------------------------------------------------------


def _grads(fn, x, wv, wh, b, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, wv, wh)]
    leaves.append(b.detach().clone().requires_grad_() if b is not None else None)
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad if t is not None else None for t in leaves]


def _check_float32_grads(x, wv, wh, b, args, gy):
    """Gradients of the float32 op against the float64 reference; returns both outputs."""
    out, grads = _grads(lambda *t: lk.sep_conv(*t, *args), x, wv, wh, b, gy)
    ref, ref_grads = _grads(lambda *t: sep_conv_reference(*t, *args), *(t.double() for t in (x, wv, wh, b, gy)))
    for name, g, r in zip(("input", "weight_v", "weight_h", "bias"), grads, ref_grads, strict=True):
        _assert_float32_grad_close(g, r, name)
    return out, ref


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"s{s[0]}p{s[1]}d{s[2]}")
@pytest.mark.parametrize("dvdh_groups", [((3, 3), 1), ((5, 1), 2), ((1, 3), 4), ((3, 5), 1), ((7, 3), 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 stride 1 runs the AVX2 kernels
def test_backward_matches_reference(split, dvdh_groups, memory_format, dtype):
    stride, padding, dilation = split
    (dv, dh), groups = dvdh_groups
    x, wv, wh, b = _make(2, 8, 13, 11, 4, 12, dv, dh, groups, True, dtype)
    x = x.contiguous(memory_format=memory_format)
    args = (stride, padding, dilation, groups)
    out_shape = sep_conv_reference(x, wv, wh, b, *args).shape
    gy = torch.randn(out_shape, dtype=dtype).contiguous(memory_format=memory_format)
    out, grads = _grads(lambda *t: lk.sep_conv(*t, *args), x, wv, wh, b, gy)
    as64 = [t.double() for t in (x, wv, wh, b, gy)]
    ref, ref_grads = _grads(lambda *t: sep_conv_reference(*t, *args), *as64)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    for name, g, r in zip(("input", "weight_v", "weight_h", "bias"), grads, ref_grads, strict=True):
        if dtype == torch.float32:
            _assert_float32_grad_close(g, r, name)
        else:
            torch.testing.assert_close(g, r, **TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")
    assert grads[0].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize(
    "shape",  # B, C, H, W, K, N, dv, dh, groups, padding, dilation
    [
        (1, 700, 6, 11, 690, 700, 3, 3, 1, (1, 1), (1, 1)),  # taps*channels > 2048: reduction passes
        (2, 96, 6, 35, 132, 200, 3, 5, 2, (2, 1), (2, 1)),  # many weight panels, groups, dilation
        (1, 7, 30, 3, 5, 3, 1, 3, 1, (0, 1), (1, 1)),  # outputs narrower than a vector
        (2, 24, 5, 14, 40, 36, 5, 3, 2, (3, 0), (1, 2)),  # padding beyond the kernel, few rows
        (1, 6, 17, 3, 3, 5, 3, 1, 1, (0, 2), (2, 1)),  # go columns outside every window
        (2, 24, 8, 19, 24, 72, 3, 3, 1, (1, 1), (1, 1)),  # 24-wide weight panels, 4 x 24 tiles
    ],
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_float32_wide_channels_forward_and_backward(shape, memory_format):
    B, C, H, W, K, N, dv, dh, groups, padding, dilation = shape
    x, wv, wh, b = _make(B, C, H, W, K, N, dv, dh, groups, True, torch.float32)
    x = x.contiguous(memory_format=memory_format)
    args = ((1, 1), padding, dilation, groups)
    gy = torch.randn(sep_conv_reference(x, wv, wh, b, *args).shape)
    out, ref = _check_float32_grads(x, wv, wh, b, args, gy)
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backward_float32_larger_tiles(memory_format):
    # Big enough that the kernel uses several multi-row tiles per image and both threads.
    x, wv, wh, b = _make(2, 16, 40, 37, 8, 24, 3, 3, 1, True, torch.float32)
    x = x.contiguous(memory_format=memory_format)
    args = ((1, 1), (1, 1), (1, 1), 1)
    gy = torch.randn(2, 24, 40, 37)
    _check_float32_grads(x, wv, wh, b, args, gy)


@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backward_many_tiles_per_image(dilation, memory_format, monkeypatch):
    # A 1 KiB tile budget gives tiles of the minimum height, so every thread runs several
    # consecutive tiles of an image and carries the vertical halo of dL/dt from one to the next.
    monkeypatch.setenv("LOWRANK_TILE_KB", "1")
    x, wv, wh, b = _make(3, 8, 31, 9, 6, 10, 3, 3, 2, True, torch.float32)
    x = x.contiguous(memory_format=memory_format)
    args = ((1, 1), (1, 1), dilation, 2)
    gy = torch.randn(sep_conv_reference(x, wv, wh, b, *args).shape)
    _check_float32_grads(x, wv, wh, b, args, gy)


@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_results_above_32_mib(huge_pages, monkeypatch):
    # With LOWRANK_HUGE_PAGES=1, outputs and grad_input of 32 MiB or more get transparent-huge-page advice.
    monkeypatch.setenv("LOWRANK_HUGE_PAGES", huge_pages)
    x, wv, wh, b = _make(2, 16, 512, 520, 2, 16, 3, 3, 1, True, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    args = ((1, 1), (1, 1), (1, 1), 1)
    gy = torch.randn(2, 16, 512, 520)
    out, grads = _grads(lambda *t: lk.sep_conv(*t, *args), x, wv, wh, b, gy)
    assert min(out.numel(), grads[0].numel()) * 4 >= 32 << 20
    ref, ref_grads = _grads(lambda *t: sep_conv_reference(*t, *args), *(t.double() for t in (x, wv, wh, b, gy)))
    torch.testing.assert_close(out, ref.float(), **TOL[torch.float32])
    _assert_float32_grad_close(grads[0], ref_grads[0], "input")
    # The weight and bias gradients sum over 532k pixels, where float32 rounding grows with the
    # reduction: bound the error by that of torch's own float32 convolutions on the same data.
    _, torch32 = _grads(lambda *t: sep_conv_reference(*t, *args), x, wv, wh, b, gy)
    for name, g, t32, r in zip(("weight_v", "weight_h", "bias"), grads[1:], torch32[1:], ref_grads[1:], strict=True):
        ours, theirs = (g.double() - r).abs().max().item(), (t32.double() - r).abs().max().item()
        assert ours <= 4 * theirs + 4e-6 * r.abs().max().item(), (name, ours, theirs)


def test_partial_gradients():
    x, wv, wh, b = _make(2, 6, 9, 10, 4, 8, 3, 3, 2, True)
    gy = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    ref_out, ref_grads = _grads(lambda *t: sep_conv_reference(*t, (1, 1), (1, 1), (1, 1), 2), x, wv, wh, b, gy)
    for mask in itertools.product([False, True], repeat=4):
        if not any(mask):
            continue
        leaves = [t.detach().clone().requires_grad_(m) for t, m in zip((x, wv, wh, b), mask, strict=True)]
        lk.sep_conv(*leaves, 1, 1, 1, 2).backward(gy)
        for leaf, m, r in zip(leaves, mask, ref_grads, strict=True):
            if m:
                torch.testing.assert_close(leaf.grad, r, **TOL[torch.float64])
            else:
                assert leaf.grad is None


@pytest.mark.parametrize(
    "args",
    [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2), ((1, 3), (2, 0), (2, 1), 1)],
)
def test_gradcheck_float64(args):
    x, wv, wh, b = _make(2, 4, 7, 9, 2, 4, 3, 3, args[3], True)
    inputs = [t.clone().requires_grad_() for t in (x, wv, wh, b)]
    assert torch.autograd.gradcheck(lambda *t: lk.sep_conv(*t, *args), inputs)


@pytest.mark.parametrize(
    "case",
    [
        ((2, 6, 7, 13, 4, 8, 3, 3, 1, True), ((1, 1), (1, 1), (1, 1), 1), torch.contiguous_format),
        ((1, 4, 9, 8, 4, 6, 5, 3, 2, False), ((2, 1), (2, 0), (1, 2), 2), torch.channels_last),
        ((0, 4, 5, 5, 2, 4, 3, 3, 1, True), ((1, 1), (1, 1), (1, 1), 1), torch.contiguous_format),
    ],
)
def test_opcheck(case):
    shape, args, memory_format = case
    x, wv, wh, b = _make(*shape)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    wv.requires_grad_()
    wh.requires_grad_()
    torch.library.opcheck(torch.ops.lowrank.sep_conv.default, (x, wv, wh, b, *[list(a) for a in args[:3]], args[3]))


# --- bad input (docs/design.md) ------------------------------------------------------


def _good():
    return _make(1, 4, 8, 8, 2, 6, 3, 3, 1, True, torch.float32)


BAD_CASES = {
    "input ndim": (lambda x, wv, wh, b: (x[0], wv, wh, b, 1, 0, 1, 1), "input"),
    "weight_v ndim": (lambda x, wv, wh, b: (x, wv[..., 0], wh, b, 1, 0, 1, 1), "weight_v"),
    "weight_v not dx1": (lambda x, wv, wh, b: (x, wv.expand(2, 4, 3, 2), wh, b, 1, 0, 1, 1), "weight_v"),
    "weight_h not 1xd": (lambda x, wv, wh, b: (x, wv, wh.expand(6, 2, 2, 3), b, 1, 0, 1, 1), "weight_h"),
    "channel mismatch": (lambda x, wv, wh, b: (x[:, :3], wv, wh, b, 1, 0, 1, 1), "channels"),
    "rank mismatch": (lambda x, wv, wh, b: (x, wv[:1], wh, b, 1, 0, 1, 1), "weight_h"),
    "groups mismatch": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, 1, 2), "groups"),
    "groups zero": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, 1, 0), "groups"),
    "out channels vs groups": (
        lambda x, wv, wh, b: (x, torch.ones(2, 2, 3, 1), torch.ones(5, 1, 1, 3), None, 1, 0, 1, 2),
        "groups",
    ),
    "stride zero": (lambda x, wv, wh, b: (x, wv, wh, b, 0, 0, 1, 1), "stride"),
    "stride negative": (lambda x, wv, wh, b: (x, wv, wh, b, (1, -1), 0, 1, 1), "stride"),
    "dilation zero": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, (0, 1), 1), "dilation"),
    "padding negative": (lambda x, wv, wh, b: (x, wv, wh, b, 1, -1, 1, 1), "padding"),
    "kernel taller than input": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, (4, 1), 1), "weight_v"),
    "kernel wider than input": (lambda x, wv, wh, b: (x[..., :2], wv, wh, b, 1, 0, 1, 1), "weight_h"),
    "bias shape": (lambda x, wv, wh, b: (x, wv, wh, b[:3], 1, 0, 1, 1), "bias"),
    "mixed dtype": (lambda x, wv, wh, b: (x, wv.double(), wh, b, 1, 0, 1, 1), "weight_v"),
    "bias dtype": (lambda x, wv, wh, b: (x, wv, wh, b.double(), 1, 0, 1, 1), "bias"),
    "integer input": (lambda x, wv, wh, b: (x.int(), wv.int(), wh.int(), None, 1, 0, 1, 1), "input"),
    "mixed device": (lambda x, wv, wh, b: (x, wv.to("meta"), wh, b, 1, 0, 1, 1), "weight_v"),
    "empty rank": (lambda x, wv, wh, b: (x, wv[:0], wh[:, :0], b, 1, 0, 1, 1), "weight_v"),
    "stride triple": (lambda x, wv, wh, b: (x, wv, wh, b, (1, 1, 1), 0, 1, 1), "stride"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_raises_clear_error(name):
    make_args, word = BAD_CASES[name]
    args = make_args(*_good())
    with pytest.raises((ValueError, RuntimeError), match=word):
        lk.sep_conv(*args)


@pytest.mark.parametrize("name", ["channel mismatch", "stride zero", "kernel taller than input", "bias shape"])
def test_bad_input_through_torch_ops_and_fake(name):
    make_args, word = BAD_CASES[name]
    x, wv, wh, b, stride, padding, dilation, groups = make_args(*_good())
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    op_args = (x, wv, wh, b, pair(stride), pair(padding), pair(dilation), groups)
    with pytest.raises((ValueError, RuntimeError), match=word):
        torch.ops.lowrank.sep_conv(*op_args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises((ValueError, RuntimeError), match=word):
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in op_args]
        torch.ops.lowrank.sep_conv(*fake)


# --- property test ---------------------------------------------------------------------


@st.composite
def _sep_conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    C = groups * draw(st.integers(1, 4))
    K = groups * draw(st.integers(1, 3))
    N = groups * draw(st.integers(1, 4))
    dv, dh = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    H = draw(st.integers(max(1, dilation[0] * (dv - 1) + 1 - 2 * padding[0]), 16))
    W = draw(st.integers(max(1, dilation[1] * (dh - 1) + 1 - 2 * padding[1]), 16))
    B = draw(st.integers(0, 3))
    bias = draw(st.booleans())
    channels_last = draw(st.booleans())
    return (B, C, H, W, K, N, dv, dh, groups, bias), (stride, padding, dilation, groups), channels_last


@settings(max_examples=60, deadline=None)
@given(_sep_conv_cases(), st.integers(0, 2**16))
def test_property_matches_reference(case, seed):
    shape, args, channels_last = case
    x, wv, wh, b = _make(*shape, seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wv, wh, b)]
    out = lk.sep_conv(*leaves, *args)
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wv, wh, b)]
    ref = sep_conv_reference(*ref_leaves, *args)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    gy = torch.randn_like(ref)
    out.backward(gy)
    ref.backward(gy)
    for g, r in zip(leaves, ref_leaves, strict=True):
        if g is not None:
            torch.testing.assert_close(g.grad, r.grad, **TOL[torch.float64])


# --- torch.compile / torch.export -------------------------------------------------------


class _TinySepNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wv = torch.nn.Parameter(torch.randn(4, 3, 3, 1, generator=g) * 0.3)
        self.wh = torch.nn.Parameter(torch.randn(8, 4, 1, 3, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(8, generator=g))

    def forward(self, x):
        y = lk.sep_conv(x, self.wv, self.wh, self.b, stride=(1, 2), padding=1)
        return torch.relu(y).mean((2, 3))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = _TinySepNet()
    x = torch.randn(2, 3, 11, 13)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    model = _TinySepNet()
    x = torch.randn(2, 3, 11, 13)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_torch_export():
    model = _TinySepNet()
    x = torch.randn(2, 3, 11, 13)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert any("lowrank.sep_conv" in str(n.target) for n in ep.graph.nodes)
    x5 = torch.randn(5, 3, 11, 13)
    torch.testing.assert_close(ep.module()(x5), model(x5))
