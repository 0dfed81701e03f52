"""sep_conv's depthwise case (groups == C == K == N, its own CPU kernels): forward and all gradients
against the float64 two-conv reference within the rounding bounds of tests/tolerances.py.

The forward kernels are vectorized per instruction-set level (LOWRANK_CPU_CAPABILITY, read once
per process), so every level this machine has runs this file's checks in a subprocess. The cases
cover channel counts around the vector widths (full strips, an overlapping last vector, fewer
channels than a vector), rows narrower than a vector (NCHW), strides, padding that leaves whole
rows without taps, dilation and tap counts other than 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_levels import machine_levels

from lowrank_kernels import sep_conv

from tolerances import assert_within, sep_conv_expected

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    # (C, H, W, dv, dh, stride, padding, dilation)
    (5, 9, 11, 3, 3, (1, 1), (1, 1), (1, 1)),
    (19, 8, 7, 3, 5, (2, 1), (1, 2), (1, 1)),
    (33, 10, 12, 5, 3, (1, 2), (2, 1), (2, 1)),
    (16, 6, 9, 1, 3, (1, 1), (0, 0), (1, 2)),
    (40, 7, 8, 3, 1, (2, 2), (3, 0), (1, 1)),
    (70, 6, 20, 3, 3, (1, 1), (1, 1), (1, 1)),
    (64, 5, 17, 3, 3, (1, 1), (1, 1), (1, 1)),
    (100, 4, 34, 3, 3, (1, 2), (1, 1), (1, 1)),
    (24, 5, 40, 2, 4, (1, 1), (0, 2), (1, 1)),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def check(case, dtype, channels_last, with_bias, seed=0, batch=3):
    c, h, w, dv, dh, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wv = torch.randn(c, 1, dv, 1, generator=gen).to(dtype)
    wh = torch.randn(c, 1, 1, dh, generator=gen).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if with_bias else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wv, wh, b)]
    y = sep_conv(*leaves, stride, padding, dilation, c)
    assert y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    args = (stride, padding, dilation, c)
    ref, ref_grads, out_bound, grad_bounds = sep_conv_expected(x, wv, wh, b, args, gy.double())
    # Results that land among the dtype's subnormals (float16 gradients can) are rounded to an
    # absolute spacing of smallest_normal * eps: half of it per rounding to the dtype (Higham's
    # underflow term), for the intermediate and the result.
    underflow = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    out_bound = out_bound + underflow
    grad_bounds = [g + underflow if g is not None else None for g in grad_bounds]
    where = f"{case} {dtype} cl={channels_last} bias={with_bias}"
    assert_within(y, ref, out_bound, f"output {where}")
    y.backward(gy)
    for name, leaf, g, bound in zip(("input", "weight_v", "weight_h", "bias"), leaves, ref_grads, grad_bounds):
        if leaf is None:
            continue
        assert_within(leaf.grad, g, bound, f"grad {name} {where}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_depthwise_forward_and_backward(case, dtype, channels_last, with_bias):
    check(case, dtype, channels_last, with_bias)


@pytest.mark.parametrize("threads", [1, 3])
def test_depthwise_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                check(CASES[5], dtype, cl, True, seed=threads, batch=2)
                check(CASES[1], dtype, cl, False, seed=threads, batch=2)
    finally:
        torch.set_num_threads(before)


def test_depthwise_rounds_the_intermediate_like_the_unfused_pair():
    # 16-bit: the intermediate is rounded to the dtype, as the two 16-bit convolutions do; the
    # fused result then differs from the unfused pair's by at most the result's rounding
    # (summation order and FMA aside), far less than from a float32 intermediate.
    from lowrank_kernels._reference import sep_conv_reference

    gen = torch.Generator().manual_seed(3)
    c = 48
    x = torch.randn(2, c, 10, 20, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wv, wh = torch.randn(c, 1, 3, 1, generator=gen), torch.randn(c, 1, 1, 3, generator=gen)
    wv, wh = wv.to(torch.bfloat16), wh.to(torch.bfloat16)
    fused = sep_conv(x, wv, wh, None, 1, 1, 1, c).double()
    pair = sep_conv_reference(x, wv, wh, None, (1, 1), (1, 1), (1, 1), c).double()
    wide = sep_conv_reference(x.float(), wv.float(), wh.float(), None, (1, 1), (1, 1), (1, 1), c).double()
    eps = torch.finfo(torch.bfloat16).eps
    assert (fused - pair).abs().max() <= 2 * eps * pair.abs().max()
    assert (fused - wide).abs().max() > (fused - pair).abs().max()


def test_depthwise_partial_gradients_and_empty_batch():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    wv, wh = torch.randn(8, 1, 3, 1, requires_grad=True), torch.randn(8, 1, 1, 3)
    sep_conv(x, wv, wh, None, 1, 1, 1, 8).sum().backward()  # only weight_v's gradient asked for
    ref, grads, _, bounds = sep_conv_expected(x, wv, wh, None, ((1, 1), (1, 1), (1, 1), 8), torch.ones(2, 8, 6, 6))
    assert_within(wv.grad, grads[1], bounds[1], "grad weight_v")
    empty = sep_conv(torch.randn(0, 8, 6, 6), wv.detach(), wh, None, 1, 1, 1, 8)
    assert empty.shape == (0, 8, 6, 6)


@pytest.mark.parametrize("capability", machine_levels())
def test_depthwise_every_dispatch_level(capability):
    env = dict(
        os.environ, LOWRANK_CPU_CAPABILITY=capability, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    # One level's checks (the test above runs this in a subprocess per level): every case, dtype
    # and layout, forward and gradients.
    for case in CASES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cl in (False, True):
                check(case, dtype, cl, True, seed=1, batch=2)
