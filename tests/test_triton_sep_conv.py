"""lowrank_kernels.triton.sep_conv against the float64 two-conv reference.

Without CUDA these run the Triton kernels in the interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1): small shapes, float32 and float16 (the interpreter cannot do bf16). The tests
marked gpu need a CUDA device and are skipped cleanly without one."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._prims_common import suggest_memory_format

pytest.importorskip("triton")

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels._conv_args import _pair  # noqa: E402
from lowrank_kernels.triton import sep_conv_kernels  # noqa: E402

from tolerances import assert_within, sep_conv_expected  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _case(B, C, H, W, K, N, dv, dh, stride=1, padding=0, dilation=1, groups=1, bias=True, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "input": torch.randn(B, C, H, W, generator=g),
        "weight_v": torch.randn(K, C // groups, dv, 1, generator=g) / (C // groups * dv) ** 0.5,
        "weight_h": torch.randn(N, K // groups, 1, dh, generator=g) / (K // groups * dh) ** 0.5,
        "bias": torch.randn(N, generator=g) if bias else None,
    }
    if channels_last:
        tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    conv = {
        "stride": _pair(stride, "stride"),
        "padding": _pair(padding, "padding"),
        "dilation": _pair(dilation, "dilation"),
    }
    return tensors, {**conv, "groups": groups}


def _check_against_reference(tensors, conv, dtype=torch.float32, device=DEVICE, grads=True):
    """Forward and every gradient of lk.triton.sep_conv against the float64 reference on the same
    values, each element within the rounding bound of its sums (tests/tolerances.py)."""
    names = [n for n, t in tensors.items() if t is not None]
    ours = {
        n: t.detach().to(device=device, dtype=dtype).requires_grad_(grads) for n, t in tensors.items() if t is not None
    }
    out = lk.triton.sep_conv(ours["input"], ours["weight_v"], ours["weight_h"], ours.get("bias"), **conv)
    assert out.dtype == dtype
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    values = [ours[n].detach().cpu() if n in ours else None for n in ("input", "weight_v", "weight_h", "bias")]
    # Output (and grad_input) follow the input's memory format, like F.conv2d (empty batch: NCHW).
    channels_last = suggest_memory_format(ours["input"]) == torch.channels_last
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last), "output must follow the input's format"
    if not grads or (out.numel() == 0 and ours["input"].shape[0] > 0):
        expected, _, bound, _ = sep_conv_expected(*values, args)
        assert_within(out.detach().cpu(), expected, bound, "output")
        return out
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    expected, want, bound, grad_bounds = sep_conv_expected(*values, args, grad_out.cpu())
    assert_within(out.detach().cpu(), expected, bound, "output")
    got = torch.autograd.grad(out, [ours[n] for n in names], grad_out)
    full = dict(zip(("input", "weight_v", "weight_h", "bias"), zip(want, grad_bounds)))
    for name, g in zip(names, got):
        assert g.dtype == dtype, name
        assert_within(g.cpu(), full[name][0], full[name][1], f"grad of {name}")
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last), "grad_input must follow the input's format"
    return out


# Each case exercises several options at once (the interpreter is slow).
CASES = {
    "basic_3x3_pad1": dict(B=1, C=3, H=7, W=13, K=4, N=5, dv=3, dh=3, padding=1),
    "stride2_pad1": dict(B=2, C=4, H=9, W=11, K=4, N=6, dv=3, dh=3, stride=2, padding=1, bias=False),
    "split_args_dv_ne_dh": dict(
        B=1, C=4, H=8, W=12, K=5, N=4, dv=2, dh=3, stride=(1, 2), padding=(0, 1), dilation=(2, 1)
    ),
    "groups2_channels_last": dict(
        B=2,
        C=4,
        H=9,
        W=11,
        K=6,
        N=4,
        dv=3,
        dh=2,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        groups=2,
        channels_last=True,
    ),
    "wide_row_tiles": dict(B=1, C=3, H=5, W=23, K=4, N=3, dv=1, dh=5, padding=(0, 2), bias=False),
    "tall_vertical_halo": dict(
        B=1, C=2, H=19, W=6, K=3, N=2, dv=5, dh=1, stride=(2, 1), padding=(3, 0), dilation=(2, 1)
    ),
    "groups3_pad_gt_kernel": dict(B=1, C=6, H=6, W=7, K=6, N=9, dv=3, dh=3, padding=(3, 2), groups=3),
    "channel_blocks": dict(B=1, C=20, H=4, W=5, K=18, N=17, dv=3, dh=3, padding=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_float32(name):
    _check_against_reference(*_case(**CASES[name]))


@pytest.mark.parametrize("name", ["basic_3x3_pad1", "groups2_channels_last", "channel_blocks"])
def test_forward_and_gradients_float16(name):
    _check_against_reference(*_case(**CASES[name]), dtype=torch.float16)


def test_float64():
    _check_against_reference(*_case(**CASES["split_args_dv_ne_dh"]), dtype=torch.float64)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_zero(channels_last):
    tensors, conv = _case(B=0, C=4, H=6, W=7, K=4, N=6, dv=3, dh=3, padding=1, groups=2, channels_last=channels_last)
    out = _check_against_reference(tensors, conv)
    assert out.shape == (0, 6, 6, 7)
    # Weight gradients are zeros (not empty) when the batch is empty.
    ours = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
    out = lk.triton.sep_conv(ours["input"], ours["weight_v"], ours["weight_h"], ours["bias"], **conv)
    out.sum().backward()
    for name in ("weight_v", "weight_h", "bias"):
        assert torch.equal(ours[name].grad, torch.zeros_like(ours[name])), name
    assert ours["input"].grad.shape == ours["input"].shape


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    data=st.data(),
    groups=st.integers(1, 2),
    dv=st.integers(1, 3),
    dh=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
)
def test_fuzz_against_reference(data, groups, dv, dh, stride, padding, dilation):
    """Random small geometries (forward and all gradients), float32."""
    span_v, span_h = dilation[0] * (dv - 1) + 1, dilation[1] * (dh - 1) + 1
    H = max(1, span_v - 2 * padding[0]) + data.draw(st.integers(0, 5), label="extra_h")
    W = max(1, span_h - 2 * padding[1]) + data.draw(st.integers(0, 6), label="extra_w")
    shape = dict(
        B=data.draw(st.integers(0, 2), label="B"),
        C=groups * data.draw(st.integers(1, 3), label="C/groups"),
        K=groups * data.draw(st.integers(1, 3), label="K/groups"),
        N=groups * data.draw(st.integers(1, 3), label="N/groups"),
    )
    tensors, conv = _case(
        **shape,
        H=H,
        W=W,
        dv=dv,
        dh=dh,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=data.draw(st.booleans(), label="bias"),
        channels_last=data.draw(st.booleans(), label="channels_last"),
    )
    _check_against_reference(tensors, conv)


def test_non_contiguous_inputs():
    tensors, conv = _case(B=2, C=8, H=7, W=9, K=4, N=6, dv=3, dh=3, padding=1, stride=(1, 2))
    big = torch.randn(2, 16, 9, 7)
    tensors["input"] = big[:, ::2].transpose(2, 3)  # strided channels and swapped spatial strides
    tensors["weight_v"] = torch.randn(4, 8, 3, 2)[..., :1]
    tensors["weight_h"] = torch.randn(1, 3, 4, 6).permute(3, 2, 0, 1)
    assert tensors["input"].shape == (2, 8, 7, 9) and tensors["weight_h"].shape == (6, 4, 1, 3)
    for name in ("input", "weight_v", "weight_h"):
        t = tensors[name]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last), name
    _check_against_reference(tensors, conv)


def test_only_some_gradients():
    """A gradient not asked for comes back empty from sep_conv_backward and None from autograd."""
    tensors, conv = _case(B=1, C=4, H=5, W=6, K=4, N=4, dv=3, dh=3, padding=1)
    kernels = sep_conv_kernels
    args = (tensors["input"], tensors["weight_v"], tensors["weight_h"])
    conv_list = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    grad_out = torch.randn(1, 4, 5, 6)
    full = kernels.sep_conv_backward(grad_out, *args, *conv_list, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = kernels.sep_conv_backward(grad_out, *args, *conv_list, mask)
        for wanted, got, ref in zip(mask, part, full):
            if wanted:
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
            else:
                assert got.numel() == 0
    x = tensors["input"].clone().requires_grad_()
    out = lk.triton.sep_conv(x, tensors["weight_v"], tensors["weight_h"], None, **conv)
    out.backward(grad_out)
    torch.testing.assert_close(x.grad, full[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input=torch.randn(4, 6, 7)), "input must be 4-D"),
        (dict(weight_v=torch.randn(4, 3, 3, 1)), "weight_v expects 3 input channels"),
        (dict(weight_h=torch.randn(6, 3, 1, 3)), "weight_h expects"),
        (dict(weight_h=torch.randn(6, 4, 1, 3).double()), "weight_h dtype"),
        (dict(bias=torch.randn(5)), "bias must have shape"),
        (dict(stride=0), "stride must be positive"),
        (dict(dilation=(1, 0)), "dilation must be positive"),
        (dict(padding=-1), "padding must be non-negative"),
        (dict(padding=(1, 2, 3)), "padding must be an int or a pair"),
        (dict(groups=True), "groups must be an int"),
        (dict(weight_h=torch.randn(6, 4, 1, 30)), "weight_h's dilated width 30 is larger than the padded input width"),
        (dict(input=torch.randint(0, 3, (1, 4, 6, 7))), "input must be a floating-point"),
    ],
)
def test_bad_input_raises(change, message):
    args = dict(
        input=torch.randn(1, 4, 6, 7),
        weight_v=torch.randn(4, 4, 3, 1),
        weight_h=torch.randn(6, 4, 1, 3),
        bias=torch.randn(6),
    )
    args.update(change)
    with pytest.raises(ValueError, match=f"^sep_conv: {message}"):
        lk.triton.sep_conv(**args)


def test_backward_rejects_bad_grad_out():
    kernels = sep_conv_kernels
    x, wv, wh = torch.randn(1, 4, 6, 7), torch.randn(4, 4, 3, 1), torch.randn(6, 4, 1, 3)
    with pytest.raises(ValueError, match="grad_out"):
        kernels.sep_conv_backward(torch.randn(1, 6, 4, 4), x, wv, wh, [1, 1], [0, 0], [1, 1], 1, [True] * 3)


def test_public_function_survives_kernel_import():
    """The kernel module (imported above) does not shadow the public function of the same op."""
    import lowrank_kernels.triton.sep_conv_kernels  # noqa: F401

    assert callable(lk.triton.sep_conv) and lk.triton.sep_conv.__module__ == "lowrank_kernels.triton"


def test_cuda_kernels_registered():
    for op in ("lowrank::sep_conv", "lowrank::sep_conv_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_registered_cuda_functions_match(monkeypatch):
    """The functions registered for the CUDA key (called here on CPU tensors, interpreter) give what
    lk.triton.sep_conv gives; and the op on CPU tensors still runs the C++ kernel, not Triton."""
    family = importlib.import_module("lowrank_kernels.sep_conv")  # the module; lk.sep_conv is the function

    tensors, conv = _case(B=1, C=4, H=5, W=6, K=4, N=6, dv=3, dh=2, padding=(1, 0), groups=2)
    x, wv, wh, b = tensors.values()
    conv_args = (tuple(conv["stride"]), tuple(conv["padding"]), tuple(conv["dilation"]), conv["groups"])
    out = family._sep_conv_cuda(x, wv, wh, b, *conv_args)
    torch.testing.assert_close(out, lk.triton.sep_conv(x, wv, wh, b, **conv), rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    got = family._sep_conv_backward_cuda(grad_out, x, wv, wh, *conv_args, (True, False, True))
    want = sep_conv_kernels.sep_conv_backward(grad_out, x, wv, wh, *conv_args, [True, False, True])
    assert got[1].numel() == 0
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)

    def no_triton(*args, **kwargs):
        raise AssertionError("the CPU op reached the Triton path")

    kernels = sep_conv_kernels
    monkeypatch.setattr(kernels, "sep_conv_forward", no_triton)
    monkeypatch.setattr(kernels, "sep_conv_backward", no_triton)
    x = x.clone().requires_grad_()
    cpu = lk.sep_conv(x, wv, wh, b, **conv)
    cpu.backward(grad_out)
    torch.testing.assert_close(cpu, out, rtol=1e-5, atol=1e-5)


def test_import_without_triton_and_cpu_path():
    """`import lowrank_kernels` works with triton missing; the CPU op still runs (C++ kernel); the
    Triton entry point fails with a clear error. A fresh interpreter, so triton can be hidden."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, lowrank_kernels as lk, lowrank_kernels._reference
x, wv, wh = torch.randn(1, 3, 5, 6), torch.randn(2, 3, 3, 1), torch.randn(4, 2, 1, 3)
torch.testing.assert_close(lk.sep_conv(x, wv, wh, padding=1),
                           lk._reference.sep_conv_reference(x, wv, wh, None, (1, 1), (1, 1), (1, 1), 1))
try:
    lk.triton.sep_conv(x, wv, wh)
except ImportError:
    print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-tensor error outside the interpreter")
def test_cpu_tensors_need_the_interpreter():
    code = """
import torch, lowrank_kernels as lk
try:
    lk.triton.sep_conv(torch.randn(1, 3, 5, 6), torch.randn(2, 3, 3, 1), torch.randn(4, 2, 1, 3))
except RuntimeError as e:
    print("needs CUDA" in str(e))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


# ------------------------------------------------------------------------------ needs a real GPU

VGG_LIKE = dict(B=2, C=64, H=28, W=28, K=32, N=96, dv=3, dh=3, padding=1)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_against_reference(dtype, channels_last):
    tensors, conv = _case(**VGG_LIKE, channels_last=channels_last)
    _check_against_reference(tensors, conv, dtype=dtype, device="cuda")


@gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_options(name):
    _check_against_reference(*_case(**CASES[name]), device="cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_cudnn_pair(dtype):
    """Same inputs through the unfused cuDNN pair in the same dtype: both round t to dtype."""
    tensors, conv = _case(**VGG_LIKE)
    x, wv, wh, b = (t.to("cuda", dtype) for t in tensors.values())
    ours = lk.triton.sep_conv(x, wv, wh, b, **conv)
    t = F.conv2d(x, wv, None, (1, 1), (1, 0), (1, 1))
    cudnn = F.conv2d(t, wh, b, (1, 1), (0, 1), (1, 1))
    # Both are within the rounding bound of the float64 reference, so within twice it of each other.
    expected, _, bound, _ = sep_conv_expected(*(t.cpu() for t in (x, wv, wh, b)), ((1, 1), (1, 1), (1, 1), 1))
    assert_within(ours.cpu(), expected, bound, "fused")
    assert_within(ours.cpu(), cudnn.cpu().double(), 2 * bound, "fused vs cuDNN pair")


@gpu
def test_gpu_op_dispatches_to_triton():
    """torch.ops.lowrank.sep_conv on CUDA tensors runs the registered Triton kernels (fwd and bwd)."""
    kernels = sep_conv_kernels
    tensors, conv = _case(**VGG_LIKE)
    ours = {n: t.cuda().requires_grad_() for n, t in tensors.items()}
    x, wv, wh, b = ours.values()
    conv_args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    via_op = lk.sep_conv(x, wv, wh, b, **conv)
    direct = kernels.sep_conv_forward(x.detach(), wv.detach(), wh.detach(), b.detach(), *conv_args)
    torch.testing.assert_close(via_op, direct, rtol=0, atol=0)
    grad_out = torch.randn_like(via_op)
    g_op = torch.autograd.grad(via_op, [x, wv, wh, b], grad_out)
    g_direct = kernels.sep_conv_backward(grad_out, x.detach(), wv.detach(), wh.detach(), *conv_args, [True] * 3)
    for a, d in zip(g_op, g_direct):
        torch.testing.assert_close(a, d, rtol=0, atol=0)
    torch.testing.assert_close(g_op[3], grad_out.sum((0, 2, 3)), rtol=0, atol=0)


@gpu
def test_gpu_opcheck_and_compile():
    tensors, conv = _case(B=2, C=8, H=9, W=10, K=4, N=6, dv=3, dh=3, padding=1, groups=2)
    x, wv, wh, b = (t.cuda() for t in tensors.values())
    args = (x, wv, wh, b, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    torch.library.opcheck(torch.ops.lowrank.sep_conv.default, args)
    compiled = torch.compile(lambda *a: lk.sep_conv(*a, **conv), fullgraph=True)
    torch.testing.assert_close(compiled(x, wv, wh, b), lk.triton.sep_conv(x, wv, wh, b, **conv), rtol=0, atol=0)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real configs run in the other tests")
def test_gpu_tile_geometry_in_interpreter(monkeypatch):
    """The GPU tile shapes (64-column forward tiles, 32-column grad_input tiles, 32-wide channel
    blocks, 3-way split weight reductions) checked in the interpreter with one GPU-sized config each."""
    triton = pytest.importorskip("triton")
    kernels = sep_conv_kernels
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    monkeypatch.setattr(kernels, "_check_device", lambda t: None)
    monkeypatch.setattr(kernels, "_splits", lambda n_pix, programs, device: 3)
    gpu_sized = {
        kernels._sep_conv_fwd_kernel: dict(BLOCK_N=32, BLOCK_K=32, BLOCK_C=32, TILE_PIXELS=128),
        kernels._sep_conv_bwd_input_kernel: dict(BLOCK_C=32, BLOCK_K=32, BLOCK_N=32, TILE_PIXELS=256),
        kernels._sep_conv_bwd_weight_h_kernel: dict(BLOCK_K=32, BLOCK_X=32, BLOCK_R=32, BLOCK_P=128),
        kernels._sep_conv_bwd_weight_v_kernel: dict(BLOCK_K=32, BLOCK_X=32, BLOCK_R=32, BLOCK_P=128),
    }
    for kernel, config in gpu_sized.items():
        monkeypatch.setattr(kernel, "configs", [triton.Config(config, num_warps=4, num_stages=2)])
    _check_against_reference(*_case(B=1, C=3, H=9, W=70, K=4, N=3, dv=3, dh=3, padding=1))
    _check_against_reference(
        *_case(
            B=1,
            C=2,
            H=40,
            W=40,
            K=3,
            N=2,
            dv=3,
            dh=5,
            stride=(2, 1),
            padding=(1, 2),
            dilation=(1, 2),
            channels_last=True,
        )
    )
    _check_against_reference(*_case(B=2, C=34, H=5, W=6, K=33, N=35, dv=3, dh=3, padding=1))
