"""householder_product: the torch.linalg.householder_product contract, gradients, bad input, Triton."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_kernels as lk
from lowrank_kernels._reference import householder_product_reference

from tolerances import gamma

_HAS_TRITON = importlib.util.find_spec("triton") is not None

# (m, n, k, batch): k < n, m == n, several panels (the kernel uses 32 reflectors per panel),
# partial last panel, k = 0, single column.
SHAPES = [
    (1, 1, 1, ()),
    (5, 3, 3, ()),
    (5, 3, 0, ()),
    (7, 7, 7, ()),
    (13, 9, 4, (3,)),
    (40, 33, 17, (2,)),
    (70, 40, 40, (2, 3)),
    (100, 64, 64, ()),
    (96, 96, 96, ()),
]


def _inputs(m, n, k, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, n, generator=g, dtype=dtype) / max(m, 1) ** 0.5
    tau = torch.rand(*batch, k, generator=g, dtype=dtype) * 2
    return A, tau


def _orthogonal_inputs(m, n, batch, dtype, seed=0):
    # tau = 2 / |v|^2 makes every H_i a reflection, so Q has orthonormal columns.
    A, _ = _inputs(m, n, n, batch, dtype, seed)
    tau = 2 / (1 + A.tril(-1).pow(2).sum(-2))
    return A, tau


def _assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, m: int, k: int, passes: int = 1):
    """got (computed in dtype) against the float64 `expected`: applying k reflectors of length m is
    a chain of about m k multiply-adds per entry per pass (forward 1, backward 2), so the error stays
    within gamma_{passes m k + m} of the entries' scale (Higham, 19.3); both sides of a comparison
    between two computed results count, hence the factor 2."""
    assert got.shape == expected.shape
    if expected.numel() == 0:
        return
    scale = float(expected.abs().max()) + 1
    bound = 2 * gamma(dtype, passes * m * max(k, 1) + m) * scale
    err = float((got.double() - expected.double()).abs().max())
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,k,batch", SHAPES)
def test_forward_matches_torch(m, n, k, batch, dtype):
    A, tau = _inputs(m, n, k, batch, dtype)
    out = lk.householder_product(A, tau)
    assert out.shape == A.shape and out.dtype == dtype and out.is_contiguous()
    _assert_close(out, torch.linalg.householder_product(A.double(), tau.double()), dtype, m, k)


@pytest.mark.parametrize("m,n,k,batch", [(5, 3, 3, ()), (13, 9, 4, (3,)), (40, 36, 36, (2,))])
def test_forward_matches_explicit_reflectors(m, n, k, batch):
    A, tau = _inputs(m, n, k, batch, torch.float64)
    torch.testing.assert_close(lk.householder_product(A, tau), householder_product_reference(A, tau))


@pytest.mark.parametrize("m,n", [(8, 8), (576, 128), (50, 37)])
def test_reflections_give_orthonormal_columns(m, n):
    A, tau = _orthogonal_inputs(m, n, (), torch.float32)
    q = lk.householder_product(A, tau)
    _assert_close(q.T @ q, torch.eye(n, dtype=torch.float64), torch.float32, m, n)


def test_entries_on_and_above_diagonal_are_ignored():
    A, tau = _inputs(9, 6, 6, (), torch.float64)
    B = A.tril(-1) + (A + 5).triu()
    torch.testing.assert_close(lk.householder_product(A, tau), lk.householder_product(B, tau))


def test_zero_tau_is_identity():
    A, _ = _inputs(12, 7, 7, (2,), torch.float32)
    out = lk.householder_product(A, torch.zeros(2, 7))
    torch.testing.assert_close(out, torch.eye(12, 7).expand(2, 12, 7))


@pytest.mark.parametrize(
    "shape,tau_shape", [((0, 5, 3), (0, 2)), ((5, 0), (0,)), ((0, 0), (0,)), ((2, 0, 4, 4), (2, 0, 4))]
)
def test_empty(shape, tau_shape):
    A, tau = torch.randn(shape), torch.rand(tau_shape)
    out = lk.householder_product(A, tau)
    assert out.shape == torch.linalg.householder_product(A, tau).shape
    A.requires_grad_(), tau.requires_grad_()
    lk.householder_product(A, tau).sum().backward()
    assert A.grad.shape == A.shape and tau.grad.shape == tau.shape


def test_non_contiguous_inputs():
    A, tau = _inputs(30, 20, 15, (3,), torch.float64)
    At = A.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major view
    taut = torch.stack([tau, tau], -1)[..., 0]  # strided
    assert not At.is_contiguous() and not taut.is_contiguous()
    torch.testing.assert_close(lk.householder_product(At, taut), torch.linalg.householder_product(A, tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,k,batch", [(5, 3, 3, ()), (13, 9, 4, (3,)), (70, 40, 40, (2,)), (100, 64, 64, ())])
def test_gradients_match_torch_autograd(m, n, k, batch, dtype):
    A, tau = _inputs(m, n, k, batch, dtype, seed=1)
    grad = torch.randn(A.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))

    def grads(fn, a, t):
        a, t = a.double().requires_grad_(), t.double().requires_grad_()
        return torch.autograd.grad(fn(a, t), (a, t), grad.double())

    expected = grads(torch.linalg.householder_product, A, tau)  # float64 truth
    a, t = A.clone().requires_grad_(), tau.clone().requires_grad_()
    got = torch.autograd.grad(lk.householder_product(a, t), (a, t), grad)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        _assert_close(g, e, dtype, m, k, passes=2)
    assert torch.count_nonzero(got[0].triu()) == 0  # on and above the diagonal: not inputs


@pytest.mark.parametrize("m,n,k,batch", [(6, 4, 3, ()), (5, 5, 5, (2,)), (37, 35, 34, ())])
def test_gradcheck(m, n, k, batch):
    A, tau = _inputs(m, n, k, batch, torch.float64, seed=3)
    A.requires_grad_(), tau.requires_grad_()
    assert torch.autograd.gradcheck(lk.householder_product, (A, tau), fast_mode=m > 20)


def test_grad_only_for_tau_or_only_for_a():
    A, tau = _inputs(9, 6, 5, (), torch.float64)
    tau.requires_grad_()
    (g_tau,) = torch.autograd.grad(lk.householder_product(A, tau).sum(), tau)
    t = tau.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.linalg.householder_product(A, t).sum(), t)
    torch.testing.assert_close(g_tau, expected)
    A.requires_grad_()
    (g_a,) = torch.autograd.grad(lk.householder_product(A, tau.detach()).sum(), A)
    assert g_a.shape == A.shape


@pytest.mark.parametrize("m,n,k,batch", [(7, 5, 5, ()), (40, 36, 20, (2,))])
def test_opcheck(m, n, k, batch):
    A, tau = _inputs(m, n, k, batch, torch.float64)
    torch.library.opcheck(torch.ops.lowrank.householder_product, (A, tau))
    torch.library.opcheck(torch.ops.lowrank.householder_product, (A.requires_grad_(), tau.requires_grad_()))
    grad = torch.randn(A.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lowrank.householder_product_backward, (grad, A.detach(), tau.detach()))


def test_torch_compile_fullgraph_and_export():
    A, tau = _inputs(20, 12, 12, (2,), torch.float32)

    def f(a, t):
        return lk.householder_product(a, t).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(A, tau), f(A, tau))

    class M(torch.nn.Module):
        def forward(self, a, t):
            return lk.householder_product(a, t)

    ep = torch.export.export(M(), (A, tau))
    assert any("householder_product" in str(node.target) for node in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(A, tau), lk.householder_product(A, tau))


@pytest.mark.parametrize(
    "shape,tau_shape,match",
    [
        ((5,), (1,), "at least 2 dimensions"),
        ((3, 5), (2,), r"input.shape\[-2\] must be greater than or equal to input.shape\[-1\]"),
        ((5, 3), (4,), r"input.shape\[-1\] must be greater than or equal to tau.shape\[-1\]"),
        ((5, 3), (2, 1), "one dimension less"),
        ((2, 5, 3), (3, 2), "batch dimensions of tau"),
    ],
)
def test_bad_shapes(shape, tau_shape, match):
    A, tau = torch.randn(shape), torch.randn(tau_shape)
    with pytest.raises(ValueError, match=f"^householder_product: .*{match}"):
        lk.householder_product(A, tau)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match=f"^householder_product: .*{match}"):
        lk.householder_product(mode.from_tensor(A), mode.from_tensor(tau))  # the fake kernel agrees


def test_bad_dtypes_and_devices():
    with pytest.raises(ValueError, match="^householder_product: tau dtype"):
        lk.householder_product(torch.randn(5, 3), torch.randn(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="^householder_product: input must be float32 or float64"):
        lk.householder_product(torch.ones(5, 3, dtype=torch.int64), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="^householder_product: input must be float32 or float64"):
        lk.householder_product(torch.randn(5, 3, dtype=torch.complex64), torch.randn(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="^householder_product: tau is on"):
        lk.householder_product(torch.randn(5, 3), torch.randn(2, device="meta"))


def test_backward_op_checks_grad_shape():
    A, tau = _inputs(5, 3, 3, (), torch.float32)
    with pytest.raises(ValueError, match="^householder_product_backward: grad must have shape"):
        torch.ops.lowrank.householder_product_backward(torch.randn(5, 4), A, tau)


# --- Triton, through the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1) ---

_triton_cpu = pytest.mark.skipif(
    not _HAS_TRITON or torch.cuda.is_available(), reason="needs triton; interpreter tests run without a GPU"
)


@_triton_cpu
@pytest.mark.parametrize(
    "m,n,k,batch,dtype",
    [
        (5, 3, 3, (), torch.float64),
        (40, 37, 35, (2,), torch.float32),  # two panels, partial last one
        (70, 40, 20, (), torch.float64),  # k < n
        (33, 33, 33, (), torch.float32),  # m == n
    ],
)
def test_triton_interpreter_matches_cpu(m, n, k, batch, dtype):
    A, tau = _inputs(m, n, k, batch, dtype, seed=4)
    _assert_close(lk.triton.householder_product(A, tau), lk.householder_product(A, tau), dtype, m, k)
    grad = torch.randn(A.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    got = lk.triton.householder_product_backward(grad, A, tau)
    expected = torch.ops.lowrank.householder_product_backward(grad, A, tau)
    for g, e in zip(got, expected):
        _assert_close(g, e, dtype, m, k, passes=2)


@_triton_cpu
def test_triton_contract_edges():
    A, tau = _inputs(6, 4, 2, (), torch.float32)
    torch.testing.assert_close(lk.triton.householder_product(A, torch.zeros(2)), torch.eye(6, 4))
    assert lk.triton.householder_product(torch.randn(0, 5, 3), torch.randn(0, 2)).shape == (0, 5, 3)
    with pytest.raises(ValueError, match="batch dimensions of tau"):
        lk.triton.householder_product(torch.randn(2, 5, 3), torch.randn(3, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    A, tau = _inputs(300, 130, 130, (3,), dtype)
    a, t = A.cuda().requires_grad_(), tau.cuda().requires_grad_()
    out = lk.householder_product(a, t)
    torch.testing.assert_close(out.cpu(), lk.householder_product(A, tau), atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (a, t), grad)
    expected = torch.ops.lowrank.householder_product_backward(grad.cpu(), A, tau)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e, atol=1e-3, rtol=1e-3)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 40),
    extra_m=st.integers(0, 30),
    k_frac=st.floats(0, 1),
    batch=st.lists(st.integers(0, 3), max_size=2),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_matches_torch(n, extra_m, k_frac, batch, double, seed):
    m, k = n + extra_m, int(round(k_frac * n))
    dtype = torch.float64 if double else torch.float32
    A, tau = _inputs(m, n, k, tuple(batch), dtype, seed)
    _assert_close(
        lk.householder_product(A, tau), torch.linalg.householder_product(A.double(), tau.double()), dtype, m, k
    )
    grad = torch.randn(A.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.ops.lowrank.householder_product_backward(grad, A, tau)
    a, t = A.double().requires_grad_(), tau.double().requires_grad_()
    expected = torch.autograd.grad(
        torch.linalg.householder_product(a, t), (a, t), grad.double(), allow_unused=True, materialize_grads=True
    )
    for g, e in zip(got, expected):
        _assert_close(g, e, dtype, m, k, passes=2)
