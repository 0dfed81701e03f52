"""sep_conv's depthwise case (groups == C == K == N, its own CPU kernel): forward and all gradients
against the float64 two-conv reference within the rounding bounds of tests/tolerances.py."""

import pytest
import torch

from lowrank_kernels import sep_conv

from tolerances import assert_within, sep_conv_expected

torch.manual_seed(0)

CASES = [
    # (C, H, W, dv, dh, stride, padding, dilation)
    (5, 9, 11, 3, 3, (1, 1), (1, 1), (1, 1)),
    (19, 8, 7, 3, 5, (2, 1), (1, 2), (1, 1)),
    (33, 10, 12, 5, 3, (1, 2), (2, 1), (2, 1)),
    (16, 6, 9, 1, 3, (1, 1), (0, 0), (1, 2)),
    (40, 7, 8, 3, 1, (2, 2), (3, 0), (1, 1)),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_depthwise_forward_and_backward(case, layout, dtype, with_bias):
    c, h, w, dv, dh, stride, padding, dilation = case
    x = torch.randn(3, c, h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wv = torch.randn(c, 1, dv, 1, dtype=dtype)
    wh = torch.randn(c, 1, 1, dh, dtype=dtype)
    b = torch.randn(c, dtype=dtype) if with_bias else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wv, wh, b)]
    y = sep_conv(*leaves, stride, padding, dilation, c)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(y)
    args = (stride, padding, dilation, c)
    ref, ref_grads, out_bound, grad_bounds = sep_conv_expected(x, wv, wh, b, args, gy.double())
    assert y.dtype == dtype
    assert_within(y, ref, out_bound, "output")
    y.backward(gy)
    for name, leaf, g, bound in zip(("input", "weight_v", "weight_h", "bias"), leaves, ref_grads, grad_bounds):
        if leaf is None:
            continue
        assert_within(leaf.grad, g, bound, f"grad {name}")


def test_depthwise_partial_gradients_and_empty_batch():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    wv, wh = torch.randn(8, 1, 3, 1, requires_grad=True), torch.randn(8, 1, 1, 3)
    sep_conv(x, wv, wh, None, 1, 1, 1, 8).sum().backward()  # only weight_v's gradient asked for
    ref, grads, _, bounds = sep_conv_expected(x, wv, wh, None, ((1, 1), (1, 1), (1, 1), 8), torch.ones(2, 8, 6, 6))
    assert_within(wv.grad, grads[1], bounds[1], "grad weight_v")
    empty = sep_conv(torch.randn(0, 8, 6, 6), wv.detach(), wh, None, 1, 1, 1, 8)
    assert empty.shape == (0, 8, 6, 6)
