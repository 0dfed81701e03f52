"""LOWRANK_CUDA_IMPL: the choice between the Triton kernels and the unfused cuDNN pair for the CUDA
kernels of lowrank::sep_conv and lowrank::sep_conv_backward. The selection and both implementations
are plain functions, so they run here on CPU tensors (Triton through its interpreter) and are checked
against autograd through the float64 two-conv reference."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import _cuda_impl
from lowrank_kernels._reference import sep_conv_reference

family = importlib.import_module("lowrank_kernels.sep_conv")  # the module; lk.sep_conv is the function

_HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def fresh_selection():
    """Forget the cached selection before and after the test (it is read once per process)."""
    _cuda_impl.cuda_impl.cache_clear()
    yield
    _cuda_impl.cuda_impl.cache_clear()


@pytest.mark.parametrize(
    ("value", "impl"),
    [(None, "triton"), ("", "triton"), ("triton", "triton"), ("cudnn", "cudnn"), (" CuDNN ", "cudnn")],
)
def test_parse_values(value, impl):
    assert _cuda_impl.parse_cuda_impl(value) == impl


@pytest.mark.parametrize("value", ["cuda", "aten", "triton,cudnn", "1"])
def test_bad_value_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"LOWRANK_CUDA_IMPL=.*triton, cudnn"):
        _cuda_impl.parse_cuda_impl(value)
    with pytest.raises(ValueError, match="LOWRANK_CUDA_IMPL"):
        _cuda_impl.sep_conv_kernels(value)


def test_environment_is_read_once(monkeypatch, fresh_selection):
    monkeypatch.setenv("LOWRANK_CUDA_IMPL", "cudnn")
    assert _cuda_impl.cuda_impl() == "cudnn"
    monkeypatch.setenv("LOWRANK_CUDA_IMPL", "triton")
    assert _cuda_impl.cuda_impl() == "cudnn"  # cached
    _cuda_impl.cuda_impl.cache_clear()
    assert _cuda_impl.cuda_impl() == "triton"
    monkeypatch.delenv("LOWRANK_CUDA_IMPL")
    _cuda_impl.cuda_impl.cache_clear()
    assert _cuda_impl.cuda_impl() == _cuda_impl.DEFAULT == "triton"
    monkeypatch.setenv("LOWRANK_CUDA_IMPL", "cuDNNN")
    _cuda_impl.cuda_impl.cache_clear()
    with pytest.raises(ValueError, match="LOWRANK_CUDA_IMPL='cuDNNN'"):
        _cuda_impl.cuda_impl()


def test_cuda_kernels_are_registered_for_every_op():
    for op in (
        "lowrank::sep_conv",
        "lowrank::sep_conv_backward",
        "lowrank::batched_svd",
        "lowrank::householder_product",
        "lowrank::householder_product_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


# (B, C, H, W, K, N, dv, dh, stride, padding, dilation, groups, channels_last)
CASES = [
    (2, 4, 7, 9, 3, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),
    (1, 6, 8, 7, 4, 6, 3, 2, (2, 1), (1, 0), (1, 2), 2, True),
    (2, 3, 6, 6, 2, 4, 1, 3, (1, 2), (0, 2), (1, 1), 1, False),
]


def _tensors(case, dtype=torch.float64):
    B, C, H, W, K, N, dv, dh, stride, padding, dilation, groups, cl = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wv = torch.randn(K, C // groups, dv, 1, generator=g, dtype=dtype)
    wh = torch.randn(N, K // groups, 1, dh, generator=g, dtype=dtype)
    b = torch.randn(N, generator=g, dtype=dtype)
    return (x, wv, wh, b), (stride, padding, dilation, groups)


def _reference_grads(args, conv, grad_out):
    x, wv, wh, b = (t.detach().requires_grad_() for t in args)
    out = sep_conv_reference(x, wv, wh, b, *conv)
    return out.detach(), torch.autograd.grad(out, (x, wv, wh), grad_out)


@pytest.mark.parametrize("case", CASES)
def test_unfused_implementation_matches_the_reference(case):
    args, conv = _tensors(case)
    forward, backward = _cuda_impl.sep_conv_kernels("cudnn")
    out = forward(*args, *conv)
    grad_out = torch.randn_like(out)
    want, want_grads = _reference_grads(args, conv, grad_out)
    torch.testing.assert_close(out, want)
    assert out.is_contiguous(memory_format=torch.channels_last if case[-1] else torch.contiguous_format)
    got = backward(grad_out, args[0], args[1], args[2], *conv, [True, True, True])
    for g, w in zip(got, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    assert got[0].is_contiguous(memory_format=torch.channels_last if case[-1] else torch.contiguous_format)
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = backward(grad_out, args[0], args[1], args[2], *conv, mask)
        for wanted, g, w in zip(mask, part, want_grads, strict=True):
            if wanted:
                torch.testing.assert_close(g, w)
            else:
                assert g.numel() == 0


def test_unfused_implementation_rejects_bad_input():
    args, conv = _tensors(CASES[0])
    forward, backward = _cuda_impl.sep_conv_kernels("cudnn")
    with pytest.raises(ValueError, match="bias"):
        forward(args[0], args[1], args[2], torch.randn(3, dtype=torch.float64), *conv)
    with pytest.raises(ValueError, match="input"):
        forward(args[0][0], *args[1:], *conv)
    with pytest.raises(ValueError, match="input"):
        backward(torch.randn(2, 5, 7, 9), args[0][0], args[1], args[2], *conv, [True, True, True])


def test_registered_kernel_follows_the_selection(monkeypatch, fresh_selection):
    """The functions registered for the CUDA key, called on CPU tensors: with cudnn selected they
    never reach Triton and give the reference's forward and gradients."""
    monkeypatch.setenv("LOWRANK_CUDA_IMPL", "cudnn")

    def no_triton(*args, **kwargs):
        raise AssertionError("LOWRANK_CUDA_IMPL=cudnn reached the Triton kernels")

    monkeypatch.setattr(_cuda_impl, "_SEP_CONV", {**_cuda_impl._SEP_CONV, "triton": (no_triton, no_triton)})
    args, conv = _tensors(CASES[1])
    out = family._sep_conv_cuda(*args, *conv)
    grad_out = torch.randn_like(out)
    want, want_grads = _reference_grads(args, conv, grad_out)
    torch.testing.assert_close(out, want)
    got = family._sep_conv_backward_cuda(grad_out, args[0], args[1], args[2], *conv, (True, True, True))
    for g, w in zip(got, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(not _HAS_TRITON or torch.cuda.is_available(), reason="Triton interpreter on CPU tensors")
@pytest.mark.parametrize("impl", _cuda_impl.CHOICES)
def test_both_implementations_agree(impl):
    """Triton (interpreter) and the unfused pair compute the same op, in float32."""
    args, conv = _tensors(CASES[1], torch.float32)
    forward, backward = _cuda_impl.sep_conv_kernels(impl)
    out = forward(*args, *conv)
    grad_out = torch.randn_like(out)
    want, want_grads = _reference_grads(tuple(t.double() for t in args), conv, grad_out.double())
    # float32 rounding over the longest sum (a weight gradient's B x H x W terms), relative to the largest value
    B, C, H, W, K, N, dv, dh = CASES[1][:8]
    tol = 8 * torch.finfo(torch.float32).eps * max(B * H * W, C * dv + K * dh)
    got = backward(grad_out, args[0], args[1], args[2], *conv, [True, True, True])
    for g, w in zip((out, *got), (want, *want_grads), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * w.abs().max().item())


def test_cpu_op_is_unaffected(monkeypatch, fresh_selection):
    """The selection only concerns CUDA tensors: the CPU op (C++ kernel) ignores it, bad value or not."""
    monkeypatch.setenv("LOWRANK_CUDA_IMPL", "nonsense")
    args, conv = _tensors(CASES[0])
    torch.testing.assert_close(lk.sep_conv(*args, *conv), sep_conv_reference(*args, *conv))
