"""OrthogonalConv2d, orthogonality_loss and orthonormality_loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowrank_kernels as lk
from lowrank_kernels._reference import (
    dense_reflector_product_reference,
    orthogonality_loss_reference,
    orthonormality_loss_reference,
)


def _randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (16, 4, 1, 1), (5, 7), (12, 2, 3, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_orthogonality_loss_matches_reference(shape, with_bias):
    w = _randn(*shape).requires_grad_()
    b = _randn(shape[0], seed=1).requires_grad_() if with_bias else None
    got = lk.orthogonality_loss(w, b)
    expected = orthogonality_loss_reference(w, b)
    torch.testing.assert_close(got, expected)
    inputs = (w, b) if with_bias else (w,)
    for g, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(g, e)


def test_orthogonality_loss_gradcheck_and_zero_for_orthogonal_columns():
    w = _randn(6, 2, 2, 2).requires_grad_()
    b = _randn(6, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lk.orthogonality_loss, (w, b))
    q, _ = torch.linalg.qr(_randn(9, 4))
    scaled = (q * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)).T  # norms do not matter
    assert lk.orthogonality_loss(scaled).item() < 1e-24


def test_orthogonality_loss_zero_column_is_finite():
    w = _randn(4, 6)
    w[1] = 0
    w.requires_grad_()
    loss = lk.orthogonality_loss(w)
    (g,) = torch.autograd.grad(loss, w)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, orthogonality_loss_reference(w[[0, 2, 3]]))


@pytest.mark.parametrize("shape", [(10, 4), (4, 10), (7, 7), (1, 3)])
def test_orthonormality_loss_matches_reference(shape):
    m = _randn(*shape).requires_grad_()
    got = lk.orthonormality_loss(m)
    expected = orthonormality_loss_reference(m)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, m)[0], torch.autograd.grad(expected, m)[0])
    assert torch.autograd.gradcheck(lk.orthonormality_loss, (m,))


def test_orthonormality_loss_float32_near_orthonormal_has_no_cancellation():
    q, _ = torch.linalg.qr(_randn(512, 256))
    q = (q + 1e-4 * _randn(512, 256, seed=3)).float()
    got = lk.orthonormality_loss(q).double()
    expected = orthonormality_loss_reference(q.double())
    assert abs(got - expected) <= 1e-3 * expected


def test_loss_bad_input():
    with pytest.raises(ValueError, match="bias must have shape"):
        lk.orthogonality_loss(torch.randn(4, 3), torch.randn(3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        lk.orthogonality_loss(torch.randn(4))
    with pytest.raises(ValueError, match="2-D"):
        lk.orthonormality_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="floating point"):
        lk.orthonormality_loss(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("bias", [True, False])
def test_orthogonal_conv_matrix_structure(bias):
    conv = lk.OrthogonalConv2d(3, 8, 3, bias=bias)
    m, n = conv.vectors.shape
    assert (m, n) == (27 + int(bias), 8)
    # Zero padding of the reflectors: vector i (1..n) has m - n + i free entries.
    free_counts = sorted(conv._free.sum(0).tolist())
    assert free_counts == [m - n + i for i in range(1, n + 1)]
    mat = conv.matrix()
    dense = dense_reflector_product_reference((conv.vectors * conv._free).detach().double())
    torch.testing.assert_close(mat.double(), dense, atol=1e-5, rtol=0)
    assert conv.orthogonality_error() < 1e-5
    weight = conv.weight
    assert weight.shape == (8, 3, 3, 3)
    torch.testing.assert_close(weight.reshape(8, -1).T, mat[:27])
    if bias:
        torch.testing.assert_close(conv.bias, mat[27])
    else:
        assert conv.bias is None


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (2, 0)), (1, "same"), (1, "valid")])
def test_orthogonal_conv_forward_matches_conv2d(stride, padding):
    conv = lk.OrthogonalConv2d(4, 6, (3, 3), stride=stride, padding=padding)
    x = torch.randn(2, 4, 9, 7)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    torch.testing.assert_close(conv(x), expected)


def test_orthogonal_conv_stays_orthogonal_while_training():
    torch.manual_seed(0)
    conv = lk.OrthogonalConv2d(3, 16, 3, padding=1)
    target = torch.nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(8, 3, 10, 10)
    y = target(x).detach()
    opt = torch.optim.Adam(conv.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(conv(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert conv.vectors.grad is not None and torch.count_nonzero(conv.vectors.grad[~conv._free]) == 0
    assert conv.orthogonality_error() < 1e-4
    mat = conv.matrix().detach().double()
    torch.testing.assert_close(mat.T @ mat, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)


def test_orthogonal_conv_gradcheck_float64():
    conv = lk.OrthogonalConv2d(2, 3, 2, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)

    vec = conv.vectors.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: torch.func.functional_call(conv, {"vectors": v}, (x,)), (vec,))


def test_orthogonal_conv_bad_arguments():
    with pytest.raises(ValueError, match="out_channels=30 exceeds"):
        lk.OrthogonalConv2d(3, 30, 3)
    with pytest.raises(ValueError, match="in_channels"):
        lk.OrthogonalConv2d(0, 3, 3)
    with pytest.raises(ValueError, match="stride"):
        lk.OrthogonalConv2d(3, 3, 3, stride=0)
    with pytest.raises(ValueError, match="padding"):
        lk.OrthogonalConv2d(3, 3, 3, padding=-1)
    with pytest.raises(ValueError, match="padding"):
        lk.OrthogonalConv2d(3, 3, 3, padding="full")


def test_torch_compile_fullgraph():
    conv = lk.OrthogonalConv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, conv(x))
    out.sum().backward()
    assert conv.vectors.grad is not None
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    loss = torch.compile(
        lambda w: lk.orthogonality_loss(w) + lk.orthonormality_loss(w.reshape(8, -1).T), fullgraph=True, backend="eager"
    )(w)
    torch.testing.assert_close(loss, lk.orthogonality_loss(w) + lk.orthonormality_loss(w.reshape(8, -1).T))
