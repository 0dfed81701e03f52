"""sep_conv's CPU kernels on every dispatch level this machine has.

The kernels pick their micro-kernels at run time: oneDNN's brgemm for the CPU's ISA (capped by
ONEDNN_MAX_CPU_ISA; bfloat16/float16 run natively where oneDNN can pack 16-bit operands, and in
float32 tile by tile elsewhere), and our own SIMD level (LOWRANK_CPU_CAPABILITY). Both are read
once per process, so each level runs in a subprocess executing this file's checks.

Every check compares with the float64 two-conv reference. The bound is elementwise: the same
reference evaluated on absolute values (|x|, |weights|, |grad_out|) bounds every partial sum, and
the error is at most (roundings of the 16-bit intermediate/result) * eps(dtype) + (reduction
length) * eps(float32) times that magnitude.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from cpu_levels import machine_levels

ROOT = Path(__file__).resolve().parents[1]

# (B, C, H, W, K, N, (dv, dh), stride, padding, dilation, groups)
CASES = [
    (2, 8, 9, 13, 6, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 16, 12, 12, 8, 12, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (2, 6, 10, 11, 4, 6, (3, 2), (2, 3), (0, 2), (2, 1), 2),
    (1, 32, 14, 14, 16, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 3, 7, 7, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 4, 17, 9, 4, 4, (5, 3), (3, 1), (2, 1), (1, 2), 1),
    (2, 64, 30, 30, 24, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # several tiles per image
    (2, 16, 6, 7, 96, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # large K*dv: NCHW goes pixel-major
    (1, 8, 9, 8, 192, 6, (3, 3), (1, 1), (1, 2), (1, 2), 2),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(case, dtype, channels_last, seed):
    B, C, H, W, K, N, (dv, dh), _, _, _, g = case
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = rnd(B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, rnd(K, C // g, dv, 1), rnd(N, K // g, 1, dh), rnd(N)


def _bound(dtype: torch.dtype, roundings: int, reduction: int) -> float:
    eps16 = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    return 2 * (roundings * eps16 + (reduction + 2) * torch.finfo(torch.float32).eps)


def check_case(case, dtype, channels_last, seed=0):
    """Forward and all four gradients of one case against the float64 reference."""
    from lowrank_kernels import sep_conv
    from lowrank_kernels._reference import sep_conv_reference as ref

    B, C, H, W, K, N, (dv, dh), stride, padding, dilation, g = case
    args = (stride, padding, dilation, g)
    ins = [t.requires_grad_() for t in _inputs(case, dtype, channels_last, seed)]
    y = sep_conv(*ins, *args)
    assert y.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    y.backward(go)

    exact = [t.detach().double().requires_grad_() for t in ins]
    r = ref(*exact, *args)
    r.backward(go.double())
    mags = [t.detach().double().abs().requires_grad_() for t in ins]
    m = ref(*mags, *args)
    m.backward(go.double().abs())

    pixels = B * y.shape[2] * W
    checks = [
        ("output", y, r.detach(), m.detach(), _bound(dtype, 2, C // g * dv + K // g * dh)),
        ("grad_input", ins[0].grad, exact[0].grad, mags[0].grad, _bound(dtype, 2, N // g * dh + K // g * dv)),
        ("grad_weight_v", ins[1].grad, exact[1].grad, mags[1].grad, _bound(dtype, 2, pixels + N // g * dh)),
        ("grad_weight_h", ins[2].grad, exact[2].grad, mags[2].grad, _bound(dtype, 3, pixels + C // g * dv)),
        ("grad_bias", ins[3].grad, exact[3].grad, mags[3].grad, _bound(dtype, 1, pixels)),
    ]
    for name, got, want, mag, rel in checks:
        assert got.dtype == dtype, name
        err = (got.double() - want).abs()
        # + the smallest normal number: an exact zero magnitude allows only underflow.
        limit = rel * mag + torch.finfo(dtype).tiny
        bad = err > limit
        assert not bad.any(), (
            f"{name} {dtype} cl={channels_last} case={case}: max error {err.max().item():.3g}, "
            f"worst ratio {(err / limit).max().item():.3g} of the bound"
        )


def run_all_checks() -> None:
    for case in CASES:
        for dtype in DTYPES:
            for cl in (False, True):
                check_case(case, dtype, cl)


_LEVELS = [(level, None) for level in machine_levels()]
if "avx2" in machine_levels():
    _LEVELS.append(("avx2", "AVX2"))  # oneDNN capped to AVX2 too: float32 tiles for 16-bit data


@pytest.mark.parametrize(("capability", "onednn_isa"), _LEVELS, ids=lambda v: str(v))
def test_every_dispatch_level(capability, onednn_isa):
    env = dict(os.environ, LOWRANK_CPU_CAPABILITY=capability, PYTHONPATH=str(ROOT))
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if onednn_isa:
        env["ONEDNN_MAX_CPU_ISA"] = onednn_isa
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_counts(threads, dtype):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for cl in (False, True):
            check_case(CASES[-1], dtype, cl, seed=threads)
            check_case(CASES[2], dtype, cl, seed=threads)
    finally:
        torch.set_num_threads(before)


def test_two_python_threads_at_once():
    errors: list[BaseException] = []

    def work(seed):
        try:
            for dtype in DTYPES:
                check_case(CASES[-1], dtype, seed % 2 == 0, seed=seed)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


if __name__ == "__main__":
    run_all_checks()
