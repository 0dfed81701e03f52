"""The CPU forward's packed-weight cache never serves weights that changed.

The cache finds an entry by the weights' data pointers and trusts it only when the weights' bytes
equal the copy it was packed from, so every way of changing weights must show in the result:
writes that bump no version counter (through `.data`, through numpy), a new tensor at the same
address, the same memory seen with another shape or groups, and the cache turned off or too small
(LOWRANK_WEIGHT_CACHE_MB, read once: those run in a child process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowrank_kernels  # noqa: F401  (loads the op library)

from tolerances import assert_within, sep_conv_expected

ARGS = ((1, 1), (1, 1), (1, 1), 1)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [torch.contiguous_format, torch.channels_last]


def _weights(C, K, N, groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    wv = torch.randn(K, C // groups, 3, 1, generator=g, dtype=torch.float64).to(dtype)
    wh = torch.randn(N, K // groups, 1, 3, generator=g, dtype=torch.float64).to(dtype)
    return wv, wh


def _check(x, wv, wh, b, args=ARGS):
    out = torch.ops.lowrank.sep_conv(x, wv, wh, b, *args)
    expected, _, bound, _ = sep_conv_expected(x, wv, wh, b, args)
    assert_within(out, expected, bound)


def _input(C, dtype, memory_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 9, 11, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_writes_that_bump_no_version_counter(dtype, memory_format):
    C, K, N = 16, 8, 12
    x = _input(C, dtype, memory_format)
    wv, wh = _weights(C, K, N, 1, dtype, seed=1)
    b = torch.zeros(N, dtype=dtype)
    _check(x, wv, wh, b)
    _check(x, wv, wh, b)  # served from the cache
    version = wv._version
    new_wv, new_wh = _weights(C, K, N, 1, dtype, seed=2)
    wv.data.copy_(new_wv)  # .data: a write the tensor's version counter does not see
    assert wv._version == version
    _check(x, wv, wh, b)
    wh.data[0, 0, 0, 1] += 1  # one element of the other weight
    _check(x, wv, wh, b)
    if dtype == torch.float32:
        wh.detach().numpy()[-1, -1, 0, -1] = -7.0  # through numpy
        _check(x, wv, wh, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_new_weights_at_a_reused_address(dtype):
    C, K, N = 16, 8, 12
    x = _input(C, dtype, torch.channels_last)
    wv, wh = _weights(C, K, N, 1, dtype, seed=3)
    _check(x, wv, wh, None)
    storage_v, storage_h = wv.data_ptr(), wh.data_ptr()
    for seed in (4, 5):
        other_v, other_h = _weights(C, K, N, 1, dtype, seed)
        wv.copy_(other_v)
        wh.copy_(other_h)
        new_v, new_h = wv.clone(), wh.clone()
        del new_v, new_h
        assert (wv.data_ptr(), wh.data_ptr()) == (storage_v, storage_h)
        _check(x, wv, wh, None)


def test_same_memory_with_other_shapes_and_groups():
    C = 16
    x = _input(C, torch.float32, torch.channels_last)
    flat_v = torch.randn(8 * 16 * 3, dtype=torch.float32)
    flat_h = torch.randn(16 * 8 * 3, dtype=torch.float32)
    # The same bytes: one group of 8 intermediate channels, then two groups of 4 per group.
    _check(x, flat_v.view(8, 16, 3, 1), flat_h.view(16, 8, 1, 3), None)
    _check(x, flat_v[: 8 * 8 * 3].view(8, 8, 3, 1), flat_h[: 16 * 4 * 3].view(16, 4, 1, 3), None, ARGS[:3] + (2,))
    _check(x, flat_v[: 16 * 8 * 3].view(16, 8, 3, 1), flat_h[: 16 * 8 * 3].view(16, 8, 1, 3), None, ARGS[:3] + (2,))
    _check(x, flat_v.view(8, 16, 3, 1), flat_h.view(16, 8, 1, 3), None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_and_permuted_weights(dtype):
    # Dense weights in another order (a model moved to channels_last) are read through their
    # strides; the same bytes seen in another order are a different weight.
    x = _input(16, dtype, torch.channels_last)
    wv, wh = _weights(16, 8, 12, 1, dtype, seed=30)
    wv_cl, wh_cl = (w.contiguous(memory_format=torch.channels_last) for w in (wv, wh))
    assert not wv_cl.is_contiguous() and not wh_cl.is_contiguous()
    _check(x, wv_cl, wh_cl, None)
    _check(x, wv_cl, wh_cl, None)
    wv_cl.data.mul_(-0.5)
    _check(x, wv_cl, wh_cl, None)
    # wh's bytes as a (12, 8, 1, 3) tensor in a permuted order: same address, other weight.
    wh_perm = wh_cl.as_strided((12, 8, 1, 3), (1, 36, 3, 12))
    _check(x, wv_cl, wh_perm, None)
    _check(x, wv_cl, wh_cl, None)


def test_weights_of_many_layers():
    # More distinct weight pairs than any small cache holds, each called twice in turn.
    layers = [_weights(16, 8, 12, 1, torch.float32, seed) for seed in range(12)]
    x = _input(16, torch.float32, torch.channels_last)
    for _ in range(2):
        for wv, wh in layers:
            _check(x, wv, wh, None)


def test_weights_that_change_every_call_then_settle():
    # A training loop (new values every call: the cache stops keeping them and retries now and
    # then), then inference on the final weights (cached again).
    x = _input(16, torch.float32, torch.channels_last)
    wv, wh = _weights(16, 8, 12, 1, torch.float32, seed=20)
    for step in range(40):
        wv.data.add_(0.01 * (step + 1))
        _check(x, wv, wh, None)
    for _ in range(20):
        _check(x, wv, wh, None)
    wh.data.neg_()
    _check(x, wv, wh, None)


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
import lowrank_kernels  # noqa: F401
import test_sep_conv_weight_cache as t
for dtype in t.DTYPES:
    for fmt in t.FORMATS:
        t.test_writes_that_bump_no_version_counter(dtype, fmt)
    t.test_new_weights_at_a_reused_address(dtype)
    t.test_channels_last_and_permuted_weights(dtype)
t.test_same_memory_with_other_shapes_and_groups()
t.test_weights_of_many_layers()
t.test_weights_that_change_every_call_then_settle()
# Weights larger than a 1 MiB cache are packed per call.
C, K, N = 256, 128, 256
x = t._input(C, torch.float32, torch.channels_last)
wv, wh = t._weights(C, K, N, 1, torch.float32, seed=9)
t._check(x, wv, wh, None)
wv.data.mul_(-1)
t._check(x, wv, wh, None)
print("child ok")
"""


def _child(cache_mb: str) -> subprocess.CompletedProcess:
    tests = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(
        [sys.executable, "-c", _CHILD.format(tests=tests)],
        env={**os.environ, "LOWRANK_WEIGHT_CACHE_MB": cache_mb},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("cache_mb", ["0", "1"], ids=["off", "1MiB"])
def test_cache_off_or_small(cache_mb):
    child = _child(cache_mb)
    assert child.returncode == 0 and "child ok" in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]


def test_bad_cache_size_is_a_clear_error():
    child = _child("lots")
    assert child.returncode != 0
    assert "LOWRANK_WEIGHT_CACHE_MB must be a non-negative integer" in child.stderr
