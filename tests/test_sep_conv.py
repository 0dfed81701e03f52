"""torch.ops.lowrank.sep_conv on CPU against the two-F.conv2d reference (docs/design.md)."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._prims_common import suggest_memory_format

import lowrank_kernels as lk
from lowrank_kernels._reference import sep_conv_reference

from tolerances import assert_within, sep_conv_expected


def _make(B, C, H, W, K, N, dv, dh, groups, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    wv = torch.randn(K, C // groups, dv, 1, generator=g, dtype=dtype) / (C // groups * dv) ** 0.5
    wh = torch.randn(N, K // groups, 1, dh, generator=g, dtype=dtype) / (K // groups * dh) ** 0.5
    b = torch.randn(N, generator=g, dtype=dtype) if bias else None
    return x, wv, wh, b


def _run(fn, tensors, gy, needs=(True, True, True, True)):
    """fn(*tensors) and, with gy, the gradients of the tensor arguments flagged in `needs`."""
    leaves = [
        t.detach().clone().requires_grad_(gy is not None and need) if t is not None else None
        for t, need in zip(tensors, needs, strict=True)
    ]
    out = fn(*leaves)
    if gy is None:
        return out.detach(), None
    out.backward(gy)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _rerun_with_env(request, **env: str) -> bool:
    """The kernels read their environment variables once per process: run this test again in a
    child process that starts with `env` set (True: done here; False: this is that child, go on)."""
    if all(os.environ.get(k) == v for k, v in env.items()):
        return False
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{request.node.nodeid}"],
        cwd=request.config.rootpath,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert "1 passed" in child.stdout
    return True


def _check_against_reference(x, wv, wh, b, args, gy=None, needs=(True, True, True, True)):
    """lk.sep_conv (and with gy the gradients flagged in `needs`) in x's dtype against the float64
    two-conv reference, each element within the rounding bound of its sums (tests/tolerances.py)."""
    dtype = x.dtype
    out, grads = _run(lambda *t: lk.sep_conv(*t, *args), (x, wv, wh, b), gy, needs)
    ref, ref_grads, out_bound, grad_bounds = sep_conv_expected(x, wv, wh, b, args, gy)
    assert out.dtype == dtype
    if out.numel() > 0:  # the output keeps the input's memory format, as F.conv2d's does
        assert out.is_contiguous(memory_format=suggest_memory_format(x))
    assert_within(out, ref, out_bound, "output")
    if gy is None:
        return out, ref
    names = ("input", "weight_v", "weight_h", "bias")
    for name, g, r, bound, need in zip(names, grads, ref_grads, grad_bounds, needs, strict=True):
        if r is None:
            continue
        if not need:
            assert g is None, f"grad {name} computed though not requested"
            continue
        assert g.dtype == dtype, f"grad {name}: dtype {g.dtype}"
        assert_within(g, r, bound, f"grad {name}")
    return out, ref


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
    _check_against_reference(x, wv, wh, b, (stride, padding, dilation, groups))


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
    _check_against_reference(x, wv, wh, b, args)


def test_conv_style_arguments():
    # int arguments mean the same value in both directions, as in F.conv2d.
    x, wv, wh, b = _make(1, 4, 9, 11, 4, 6, 3, 3, 2, True)
    out = lk.sep_conv(x, wv, wh, b, stride=2, padding=1, dilation=(2, 1), groups=2)
    expanded = lk.sep_conv(x, wv, wh, b, (2, 2), (1, 1), (2, 1), 2)
    op = torch.ops.lowrank.sep_conv(x, wv, wh, b, [2, 2], [1, 1], [2, 1], 2)
    torch.testing.assert_close(out, expanded, rtol=0, atol=0)
    torch.testing.assert_close(op, expanded, rtol=0, atol=0)
    _check_against_reference(x, wv, wh, b, ((2, 2), (1, 1), (2, 1), 2))


def test_numpy_integer_arguments():
    # nn.Conv2d accepts numpy integers for its sizes; so does sep_conv.
    np = pytest.importorskip("numpy")
    x, wv, wh, b = _make(1, 4, 9, 11, 4, 6, 3, 3, 2, True)
    out = lk.sep_conv(x, wv, wh, b, np.int64(2), (np.int32(1), 1), np.int64(1), np.int64(2))
    torch.testing.assert_close(out, lk.sep_conv(x, wv, wh, b, 2, 1, 1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_zero(memory_format, dtype):
    x, wv, wh, b = _make(0, 6, 7, 13, 4, 8, 3, 3, 1, True, dtype)
    x = x.contiguous(memory_format=memory_format)
    leaves = [t.clone().requires_grad_() for t in (x, wv, wh, b)]
    out = lk.sep_conv(*leaves, 1, 1)
    assert out.shape == (0, 8, 7, 13)
    out.sum().backward()
    assert leaves[0].grad.shape == x.shape
    for t, name in zip(leaves[1:], ("weight_v", "weight_h", "bias"), strict=True):
        assert t.grad.shape == t.shape, name
        assert torch.equal(t.grad, torch.zeros_like(t)), f"grad {name} of an empty batch must be zero"


def test_non_contiguous_views():
    base, wv, wh, b = _make(4, 10, 14, 30, 6, 8, 3, 5, 1, True)
    for x in (base[::2, 2:8], base[:, :6, 1::2, ::3], base.transpose(2, 3)[:, :6], base[..., 3:20][:, 4:]):
        w_v = wv[:, : x.shape[1]]
        _check_against_reference(x, w_v, wh, b, ((1, 2), (1, 2), (1, 1), 1))
    # Non-contiguous weights and bias too.
    wv_t = torch.randn(10, 6, 3, 1, dtype=torch.float64).transpose(0, 1)
    assert not wv_t.is_contiguous()
    x = base[:, :10]
    b_view = torch.randn(16, dtype=torch.float64)[::2]
    _check_against_reference(x, wv_t, wh, b_view, ((1, 1), (1, 1), (1, 1), 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_16_bit_forward_and_backward(dtype, memory_format):
    # 16-bit operands, float32 accumulation, 16-bit intermediate tile and result.
    x, wv, wh, b = (t.to(dtype) for t in _make(2, 8, 9, 10, 4, 6, 3, 3, 1, True, torch.float32))
    x = x.contiguous(memory_format=memory_format)
    gy = torch.randn(2, 6, 9, 10).to(dtype).contiguous(memory_format=memory_format)
    _check_against_reference(x, wv, wh, b, ((1, 1), (1, 1), (1, 1), 1), gy)


# --- backward -------------------------------------------------------------------------


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
    _check_against_reference(x, wv, wh, b, args, gy)
    x_leaf = x.clone().requires_grad_()
    lk.sep_conv(x_leaf, wv, wh, b, *args).backward(gy)
    assert x_leaf.grad.is_contiguous(memory_format=memory_format)


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
    _check_against_reference(x, wv, wh, b, args, gy)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backward_float32_larger_tiles(memory_format):
    # Big enough that the kernel uses several multi-row tiles per image and both threads.
    x, wv, wh, b = _make(2, 16, 40, 37, 8, 24, 3, 3, 1, True, torch.float32)
    x = x.contiguous(memory_format=memory_format)
    args = ((1, 1), (1, 1), (1, 1), 1)
    gy = torch.randn(2, 24, 40, 37)
    _check_against_reference(x, wv, wh, b, args, gy)


@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backward_many_tiles_per_image(dilation, memory_format, request):
    # A 1 KiB tile budget gives tiles of the minimum height, so every thread runs several
    # consecutive tiles of an image (and even/odd tile passes write neighbouring rows).
    if _rerun_with_env(request, LOWRANK_TILE_KB="1"):
        return
    x, wv, wh, b = _make(3, 8, 31, 9, 6, 10, 3, 3, 2, True, torch.float32)
    x = x.contiguous(memory_format=memory_format)
    args = ((1, 1), (1, 1), dilation, 2)
    gy = torch.randn(sep_conv_reference(x, wv, wh, b, *args).shape)
    _check_against_reference(x, wv, wh, b, args, gy)


@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_results_above_32_mib(huge_pages, request):
    # With LOWRANK_HUGE_PAGES=1, outputs and grad_input of 32 MiB or more get transparent-huge-page advice.
    if _rerun_with_env(request, LOWRANK_HUGE_PAGES=huge_pages):
        return
    x, wv, wh, b = _make(2, 16, 512, 520, 2, 16, 3, 3, 1, True, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    args = ((1, 1), (1, 1), (1, 1), 1)
    gy = torch.randn(2, 16, 512, 520)
    assert x.numel() * 4 >= 32 << 20 and gy.numel() * 4 >= 32 << 20
    # The weight and bias gradients sum over 532k pixels: the bound grows with that reduction.
    _check_against_reference(x, wv, wh, b, args, gy)


def test_partial_gradients():
    x, wv, wh, b = _make(2, 6, 9, 10, 4, 8, 3, 3, 2, True)
    gy = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    for mask in itertools.product([False, True], repeat=4):
        if any(mask):
            _check_against_reference(x, wv, wh, b, ((1, 1), (1, 1), (1, 1), 2), gy, needs=mask)


@pytest.mark.parametrize(
    "args",
    [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2), ((1, 3), (2, 0), (2, 1), 1)],
)
def test_gradcheck_float64(args):
    x, wv, wh, b = _make(2, 4, 7, 9, 2, 4, 3, 3, args[3], True)
    inputs = [t.clone().requires_grad_() for t in (x, wv, wh, b)]
    assert torch.autograd.gradcheck(lambda *t: lk.sep_conv(*t, *args), inputs)


@pytest.mark.parametrize("args", [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2)])
def test_double_backward(args):
    # create_graph=True gives a differentiable gradient (gradient penalties, Hessian-vector products).
    x, wv, wh, b = _make(2, 4, 7, 9, 2, 4, 3, 3, args[3], True)
    inputs = [t.clone().requires_grad_() for t in (x, wv, wh, b)]
    assert torch.autograd.gradgradcheck(lambda *t: lk.sep_conv(*t, *args), inputs)

    def penalty(fn, tensors):  # || d sum(out^2) / d input ||^2, differentiated once more
        leaves = [t.clone().requires_grad_() for t in tensors]
        (g,) = torch.autograd.grad(fn(*leaves, *args).pow(2).sum(), leaves[0], create_graph=True)
        g.pow(2).sum().backward()
        return [t.grad for t in leaves]

    ours, ref = penalty(lk.sep_conv, (x, wv, wh, b)), penalty(sep_conv_reference, (x, wv, wh, b))
    for name, g, r in zip(("input", "weight_v", "weight_h", "bias"), ours, ref, strict=True):
        # float64 sums of a few hundred terms round at ~1e-13 of their scale; 1e-10 leaves room for cancellation.
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10 * float(r.abs().max()), msg=name)


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
    "input ndim": (lambda x, wv, wh, b: (x[0], wv, wh, b, 1, 0, 1, 1), "input must be 4-D"),
    "weight_v ndim": (lambda x, wv, wh, b: (x, wv[..., 0], wh, b, 1, 0, 1, 1), "weight_v must have shape"),
    "weight_v not dx1": (
        lambda x, wv, wh, b: (x, wv.expand(2, 4, 3, 2), wh, b, 1, 0, 1, 1),
        "weight_v must have shape",
    ),
    "weight_h not 1xd": (
        lambda x, wv, wh, b: (x, wv, wh.expand(6, 2, 2, 3), b, 1, 0, 1, 1),
        "weight_h must have shape",
    ),
    "channel mismatch": (
        lambda x, wv, wh, b: (x[:, :3], wv, wh, b, 1, 0, 1, 1),
        "weight_v expects 4 input channels.* input has 3",
    ),
    "rank mismatch": (
        lambda x, wv, wh, b: (x, wv[:1], wh, b, 1, 0, 1, 1),
        "weight_h expects 2 channels .* weight_v produces 1",
    ),
    "groups mismatch": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, 1, 2), "weight_v expects .* groups=2"),
    "groups zero": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, 1, 0), "groups must be positive"),
    "out channels vs groups": (
        lambda x, wv, wh, b: (x, torch.ones(2, 2, 3, 1), torch.ones(5, 1, 1, 3), None, 1, 0, 1, 2),
        "weight_h has 5 output channels, not divisible by groups=2",
    ),
    "stride zero": (lambda x, wv, wh, b: (x, wv, wh, b, 0, 0, 1, 1), "stride must be positive"),
    "stride negative": (lambda x, wv, wh, b: (x, wv, wh, b, (1, -1), 0, 1, 1), "stride must be positive"),
    "dilation zero": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, (0, 1), 1), "dilation must be positive"),
    "padding negative": (lambda x, wv, wh, b: (x, wv, wh, b, 1, -1, 1, 1), "padding must be non-negative"),
    "kernel taller than input": (lambda x, wv, wh, b: (x, wv, wh, b, 1, 0, (4, 1), 1), "weight_v's dilated height"),
    "kernel wider than input": (lambda x, wv, wh, b: (x[..., :2], wv, wh, b, 1, 0, 1, 1), "weight_h's dilated width"),
    "bias shape": (lambda x, wv, wh, b: (x, wv, wh, b[:3], 1, 0, 1, 1), "bias must have shape"),
    "mixed dtype": (lambda x, wv, wh, b: (x, wv.double(), wh, b, 1, 0, 1, 1), "weight_v dtype"),
    "bias dtype": (lambda x, wv, wh, b: (x, wv, wh, b.double(), 1, 0, 1, 1), "bias dtype"),
    "integer input": (
        lambda x, wv, wh, b: (x.int(), wv.int(), wh.int(), None, 1, 0, 1, 1),
        "input must be a floating-point",
    ),
    "mixed device": (lambda x, wv, wh, b: (x, wv.to("meta"), wh, b, 1, 0, 1, 1), "weight_v is on meta"),
    "empty rank": (lambda x, wv, wh, b: (x, wv[:0], wh[:, :0], b, 1, 0, 1, 1), "weight_v must not be empty"),
    "stride triple": (lambda x, wv, wh, b: (x, wv, wh, b, (1, 1, 1), 0, 1, 1), "stride must be an int or a pair"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_raises_clear_error(name):
    # Each message starts with the offending argument's name (after the op's name).
    make_args, message = BAD_CASES[name]
    args = make_args(*_good())
    with pytest.raises(ValueError, match=f"^sep_conv: {message}"):
        lk.sep_conv(*args)


@pytest.mark.parametrize("name", ["channel mismatch", "stride zero", "kernel taller than input", "bias shape"])
def test_bad_input_through_torch_ops_and_fake(name):
    make_args, message = BAD_CASES[name]
    x, wv, wh, b, stride, padding, dilation, groups = make_args(*_good())
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    op_args = (x, wv, wh, b, pair(stride), pair(padding), pair(dilation), groups)
    with pytest.raises(ValueError, match=f"^sep_conv: {message}"):
        torch.ops.lowrank.sep_conv(*op_args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match=f"^sep_conv: {message}"):
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in op_args]
        torch.ops.lowrank.sep_conv(*fake)


# --- property test ---------------------------------------------------------------------


@st.composite
def _sep_conv_cases(draw, max_channels=4, max_size=16):
    groups = draw(st.sampled_from([1, 2, 3]))
    C = groups * draw(st.integers(1, max_channels))
    K = groups * draw(st.integers(1, max_channels))
    N = groups * draw(st.integers(1, max_channels))
    dv, dh = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    H = draw(st.integers(max(1, dilation[0] * (dv - 1) + 1 - 2 * padding[0]), max_size))
    W = draw(st.integers(max(1, dilation[1] * (dh - 1) + 1 - 2 * padding[1]), max_size))
    B = draw(st.integers(0, 3))
    bias = draw(st.booleans())
    channels_last = draw(st.booleans())
    return (B, C, H, W, K, N, dv, dh, groups, bias), (stride, padding, dilation, groups), channels_last


def _fuzz_case(case, seed, dtype):
    shape, args, channels_last = case
    x, wv, wh, b = _make(*shape, dtype=dtype, seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out_shape = sep_conv_reference(x, wv, wh, b, *args).shape
    gy = torch.randn(out_shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    _check_against_reference(x, wv, wh, b, args, gy.contiguous(memory_format=fmt))


@settings(max_examples=60, deadline=None)
@given(_sep_conv_cases(), st.integers(0, 2**16))
def test_property_matches_reference(case, seed):
    _fuzz_case(case, seed, torch.float64)


# float32 is where the vector tails and tile edges live: channel counts and widths cross the
# 8- and 16-lane vector widths and the 32-column blocks of the micro-kernels.
@settings(max_examples=40, deadline=None)
@given(_sep_conv_cases(max_channels=40, max_size=40), st.integers(0, 2**16))
def test_property_float32_crosses_tile_and_tail_boundaries(case, seed):
    _fuzz_case(case, seed, torch.float32)


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
