"""batched_svd: CPU kernel, Triton kernel (interpreter), autograd, opcheck, bad input.

Results are compared through invariants (reconstruction, orthogonality, singular values
against float64 LAPACK), never U/V entrywise: singular vectors are only defined up to sign
(and up to a rotation for repeated singular values)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_kernels as lk
from lowrank_kernels._reference import batched_svd_reference

from tolerances import svd_backward_error, truncation_gap_factor


def _orth_err(Q: torch.Tensor) -> float:
    """max over the batch of ||Q^T Q - I||_F for (..., l, k) Q."""
    if Q.numel() == 0:
        return 0.0
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return (Q.double().mT @ Q.double() - eye).flatten(-2).norm(dim=-1).max().item()


def orth_tol(dtype: torch.dtype, m: int, n: int) -> float:
    """Bound on ||Q^T Q - I||_F for the k = min(m, n) computed singular vectors: the backward
    error per column pair, over the Frobenius norm of k columns."""
    return svd_backward_error(dtype, m, n) * math.sqrt(min(m, n))


def check_svd(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank=None, scale=1.0):
    """Assert the batched_svd contract for A against float64 LAPACK, within the bounds of a
    backward-stable SVD (tests/tolerances.py); `scale` widens them for an algorithm whose error
    constant is larger (the Triton kernel's Jacobi rotations accumulate in the input dtype)."""
    *batch, m, n = A.shape
    k = min(m, n) if rank is None else rank
    assert U.shape == (*batch, m, k) and S.shape == (*batch, k) and Vh.shape == (*batch, k, n)
    assert U.dtype == S.dtype == Vh.dtype == A.dtype
    if A.numel() == 0:
        return
    err = svd_backward_error(A.dtype, m, n) * scale  # ||E||_2 / ||A||_2
    Ur, Sr, Vhr = batched_svd_reference(A.double(), k)
    assert (S >= 0).all()
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values not sorted descending"
    norm = A.double().flatten(-2).norm(dim=-1).clamp_min(1e-300)  # >= ||A||_2
    # Weyl: each singular value moves by at most ||E||_2.
    assert ((S.double() - Sr).abs().amax(dim=-1) / norm).max() <= err
    # Wedin: the rank-k truncation moves by ||E||_2 (1 + 2 sigma_1 / gap_k) in the 2-norm, and its
    # difference has rank <= 2k, so sqrt(2k) times that in the Frobenius norm.
    full_S = torch.linalg.svdvals(A.double())
    bound = err * truncation_gap_factor(full_S, k) * math.sqrt(2 * k)
    rec = U.double() @ torch.diag_embed(S.double()) @ Vh.double()
    rec_ref = Ur @ torch.diag_embed(Sr) @ Vhr
    assert ((rec - rec_ref).flatten(-2).norm(dim=-1) / norm <= bound).all()
    assert _orth_err(U) <= orth_tol(A.dtype, m, n) * scale
    assert _orth_err(Vh.mT) <= orth_tol(A.dtype, m, n) * scale


SHAPES = [
    (4, 8, 8),
    (9, 16, 16),
    (5, 7, 3),  # tall
    (5, 3, 7),  # wide
    (3, 1, 6),
    (3, 6, 1),
    (3, 1, 20),  # float32: smallest k on the Gram route
    (3, 20, 2),
    (1, 1, 1),
    (2, 3, 4, 5),  # extra batch dims
    (3, 32, 32),
    (2, 64, 64),
    (2, 64, 20),
    (3, 200, 64),  # largest Jacobi size: min(m, n) = 64, long side unlimited
    (1, 90, 70),  # min(m, n) > 64: LAPACK fallback with the same contract
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, dtype):
    torch.manual_seed(0)
    A = torch.randn(shape, dtype=dtype)
    check_svd(A, *lk.batched_svd(A))


@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 4), (2, 5, 0), (0, 3)], ids=str)
def test_empty(shape):
    A = torch.randn(shape)
    U, S, Vh = lk.batched_svd(A)
    Ur, Sr, Vhr = batched_svd_reference(A)
    assert U.shape == Ur.shape and S.shape == Sr.shape and Vh.shape == Vhr.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,rank", [((6, 8, 8), 3), ((4, 12, 5), 1), ((4, 5, 12), 5), ((2, 2, 16, 16), 4), ((2, 70, 80), 10)]
)
def test_rank(shape, rank, dtype):
    torch.manual_seed(1)
    A = torch.randn(shape, dtype=dtype)
    U, S, Vh = lk.batched_svd(A, rank)
    check_svd(A, U, S, Vh, rank)
    Uf, Sf, Vhf = lk.batched_svd(A)
    torch.testing.assert_close(S, Sf[..., :rank], rtol=0, atol=0)  # leading triplets of the full result


def test_non_contiguous():
    torch.manual_seed(2)
    A = torch.randn(6, 9, 7).transpose(-1, -2)[::2]
    check_svd(A, *lk.batched_svd(A))


def _with_singular_values(s: list[float], m: int, n: int, batch: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(batch, m, m, dtype=torch.float64, generator=g))[0][..., : len(s)]
    Q2 = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64, generator=g))[0][..., : len(s)]
    return (Q1 * torch.tensor(s, dtype=torch.float64) @ Q2.mT).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sigma,m,n",
    [
        ([3.0, 3.0, 1.0, 1.0, 1.0], 5, 5),  # repeated
        ([2.0, 1.0, 0.0, 0.0], 6, 4),  # rank-deficient, tall
        ([5.0, 0.0, 0.0], 3, 7),  # rank 1, wide
        ([1.0] * 8, 8, 8),  # orthogonal
        ([1.0, 1e-3, 1e-6, 1e-9], 4, 4),  # graded
    ],
)
def test_degenerate(sigma, m, n, dtype):
    A = _with_singular_values(sigma, m, n, batch=6, dtype=dtype)
    U, S, Vh = lk.batched_svd(A)
    check_svd(A, U, S, Vh)
    # rank-deficient: U is still completed to an orthonormal set
    assert _orth_err(U) <= orth_tol(dtype, m, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_matrices(dtype):
    for A in [
        torch.zeros(3, 4, 5, dtype=dtype),
        torch.eye(6, dtype=dtype).expand(2, 6, 6),
        torch.ones(2, 7, 3, dtype=dtype),
        torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=dtype)).expand(2, 4, 4),
    ]:
        U, S, Vh = lk.batched_svd(A)
        check_svd(A, U, S, Vh)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_extreme_scales_float32(magnitude):
    torch.manual_seed(3)
    A = torch.randn(5, 6, 6) * magnitude
    U, S, Vh = lk.batched_svd(A)
    assert torch.isfinite(S).all()
    check_svd(A / magnitude, U, S / magnitude, Vh)


@pytest.mark.parametrize("shape", [(5, 6, 4), (5, 66, 70)], ids=["jacobi", "lapack_fallback"])
def test_nan_inf_input(shape):
    torch.manual_seed(4)
    A = torch.randn(shape)
    A[1, 2, 3] = float("nan")
    A[3, 0, 0] = float("inf")
    U, S, Vh = lk.batched_svd(A)  # documented: no error, no hang
    for b in (1, 3):
        assert torch.isnan(U[b]).all() and torch.isnan(S[b]).all() and torch.isnan(Vh[b]).all()
    good = [0, 2, 4]
    check_svd(A[good], U[good], S[good], Vh[good])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # Gram route / Jacobi
def test_non_convergence_is_reported(dtype):
    torch.manual_seed(5)
    A = torch.randn(10, 16, 16, dtype=dtype)
    with pytest.raises(RuntimeError, match="did not converge within max_sweeps=1"):
        lk.batched_svd(A, max_sweeps=1)


# ---- float32 beyond 8 x 8: the Gram route (eigen-decomposition of A^T A in double) ----------


@pytest.mark.parametrize("kappa", [1e3, 1e6])
@pytest.mark.parametrize("m,n", [(16, 16), (32, 32), (64, 64), (40, 32), (24, 64)])
def test_float32_ill_conditioned(m, n, kappa):
    """Log-spaced singular values down to sigma_max / kappa: orthogonality must survive the
    squaring of the condition number in A^T A (Gram-Schmidt repair of U)."""
    k = min(m, n)
    sigma = torch.logspace(0, -math.log10(kappa), k).tolist()
    A = _with_singular_values(sigma, m, n, batch=6, dtype=torch.float32, seed=int(kappa) % 97 + k)
    check_svd(A, *lk.batched_svd(A))


def _block_diagonal(sizes: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.block_diag(*[torch.randn(s, s, generator=g) for s in sizes])


def test_float32_mixed_structure_in_one_group():
    """Matrices of different structure side by side in the same SIMD group (consecutive batch
    entries): split tridiagonals (block-diagonal and diagonal input), zero, rank-deficient and
    repeated singular values next to a generic matrix, so the lanes deflate at different rows."""
    n = 24
    g = torch.Generator().manual_seed(7)
    mats = [
        torch.randn(n, n, generator=g),
        _block_diagonal([5, 11, 8], seed=8),
        torch.diag(torch.linspace(3.0, 0.5, n)),
        torch.zeros(n, n),
        _with_singular_values([2.0, 1.5, 1.0, 0.5, 0.25], n, n, batch=1, dtype=torch.float64, seed=9)[0],
        _with_singular_values([1.0] * 12 + [0.5] * 12, n, n, batch=1, dtype=torch.float64, seed=10)[0],
        _block_diagonal([1, 23], seed=11),
        torch.eye(n)[torch.randperm(n, generator=g)],  # permutation: all singular values 1
    ]
    A = torch.stack([a.float() for a in mats])
    for order in (A, A.flip(0), A[torch.randperm(len(mats), generator=g)]):
        U, S, Vh = lk.batched_svd(order)
        check_svd(order, U, S, Vh)


@pytest.mark.parametrize("n", [32, 64])
def test_float32_rank_deficient_large(n):
    sigma = [3.0, 2.0, 1.0] + [1e-3] * 4 + [0.0] * (n - 7)
    A = _with_singular_values(sigma, n, n, batch=5, dtype=torch.float32, seed=n)
    U, S, Vh = lk.batched_svd(A)
    check_svd(A, U, S, Vh)


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: torch.randn(4, dtype=torch.float32), {}, "A must have at least 2 dimensions"),
        (lambda: torch.ones(3, 3, dtype=torch.int64), {}, "A must be float32 or float64"),
        (lambda: torch.ones(3, 3, dtype=torch.float16), {}, "A must be float32 or float64"),
        (lambda: torch.randn(2, 4, 3), {"rank": 0}, "rank must be in"),
        (lambda: torch.randn(2, 4, 3), {"rank": 4}, "rank must be in"),
        (lambda: torch.randn(2, 4, 3), {"rank": True}, "rank must be an int"),
        (lambda: torch.randn(2, 4, 3), {"rank": 2.0}, "rank must be an int"),
        (lambda: torch.randn(2, 4, 3), {"max_sweeps": 0}, "max_sweeps must be"),
        (lambda: [[1.0, 2.0]], {}, "A must be a Tensor"),
    ],
)
def test_bad_input(make, kwargs, match):
    with pytest.raises(ValueError, match=f"^batched_svd: {match}"):
        lk.batched_svd(make(), **kwargs)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 9),
    m=st.integers(1, 20),
    n=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
)
def test_fuzz(batch, m, n, dtype, data):
    rank = data.draw(st.none() | st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    A = torch.randn(batch, m, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    check_svd(A, *lk.batched_svd(A, rank), rank=rank)


# ---- autograd ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,rank", [((2, 5, 5), None), ((2, 6, 4), None), ((2, 3, 6), None), ((2, 6, 5), 3)])
def test_gradcheck(shape, rank):
    torch.manual_seed(6)
    A = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: lk.batched_svd(a, rank), (A,))


def test_gradgradcheck():
    torch.manual_seed(7)
    A = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: lk.batched_svd(a), (A,))


def test_gradient_matches_torch_when_defined():
    torch.manual_seed(8)
    A = torch.randn(3, 6, 4, dtype=torch.float64)
    G = [torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]

    def loss(fn):
        a = A.clone().requires_grad_()
        U, S, Vh = fn(a)
        # sign-invariant in each singular pair: products u_j v_j^T and sigma_j
        out = ((U.unsqueeze(-1) * Vh.unsqueeze(-3)).sum(-2) * G[0]).sum() + (S * G[1]).sum()
        out.backward()
        return a.grad

    torch.testing.assert_close(loss(lk.batched_svd), loss(lambda a: torch.linalg.svd(a, full_matrices=False)))


@pytest.mark.parametrize(
    "sigma,m,n",
    [([2.0, 2.0, 2.0, 1.0], 4, 4), ([1.0, 1.0, 0.0, 0.0], 5, 4), ([3.0, 0.0, 0.0], 3, 6)],
)
def test_gradient_degenerate_is_finite(sigma, m, n):
    A = _with_singular_values(sigma, m, n, batch=2, dtype=torch.float64, seed=9).requires_grad_()
    G = torch.randn(2, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def loss(U, S, Vh):  # depends on the (arbitrary) basis of the degenerate subspace
        return U.sum() + Vh.pow(3).sum() + S.sum() + (((U * S.unsqueeze(-2)) @ Vh) * G).sum()

    # The textbook formula divides by sigma_j^2 - sigma_i^2 = 0 here; our contract is a finite gradient.
    loss(*lk.batched_svd(A)).backward()
    assert torch.isfinite(A.grad).all()


def test_gradient_exact_for_subspace_and_spectral_losses_at_degeneracy():
    # sigma = (2, 2, 2, 1): the top-3 projector and the nuclear norm are smooth here.
    A = _with_singular_values([2.0, 2.0, 2.0, 1.0], 4, 4, batch=2, dtype=torch.float64, seed=15)
    A.requires_grad_()

    def top3_projector(a):
        U, _, _ = lk.batched_svd(a, 3)
        return U @ U.mT

    assert torch.autograd.gradcheck(top3_projector, (A,))
    A.grad = None
    lk.batched_svd(A)[1].sum().backward()  # nuclear norm: gradient U V^T
    U, _, Vh = torch.linalg.svd(A.detach())
    torch.testing.assert_close(A.grad, U @ Vh)


def test_gradient_truncated_projector_against_finite_differences():
    torch.manual_seed(11)
    A = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def proj(a):
        U, _, _ = lk.batched_svd(a, 2)
        return U @ U.mT  # depends on the discarded singular values through the gaps

    assert torch.autograd.gradcheck(proj, (A,))


def test_opcheck():
    torch.manual_seed(12)
    for args in [
        (torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True), None, 40),
        (torch.randn(2, 3, 6, requires_grad=True), 2, 40),
        (torch.randn(4, 4, dtype=torch.float64), None, 40),
    ]:
        torch.library.opcheck(torch.ops.lowrank.batched_svd.default, args)


def test_compile_and_export():
    torch.manual_seed(13)

    def f(a):
        U, S, Vh = lk.batched_svd(a, 3)
        return (U * S.unsqueeze(-2)) @ Vh

    A = torch.randn(4, 6, 5)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(A), f(A))

    class M(torch.nn.Module):
        def forward(self, a):
            return f(a)

    ep = torch.export.export(M(), (A,))
    torch.testing.assert_close(ep.module()(A), f(A))


# ---- Triton (interpreter on CPU) ---------------------------------------------------------


@pytest.fixture(scope="module")
def triton_svd():
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 before triton is imported")
    from lowrank_kernels.triton import batched_svd

    return batched_svd


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_shapes(triton_svd, dtype):
    torch.manual_seed(14)
    for shape, rank in [((3, 8, 8), None), ((2, 5, 3), None), ((2, 3, 5), 2), ((1, 1, 4), None)]:
        A = torch.randn(shape, dtype=dtype, device=_device())
        U, S, Vh = triton_svd(A, rank)
        check_svd(A.cpu(), U.cpu(), S.cpu(), Vh.cpu(), rank, scale=4.0 if dtype == torch.float32 else 1.0)


def test_triton_degenerate_nan_and_empty(triton_svd):
    A = _with_singular_values([2.0, 1.0, 0.0, 0.0], 6, 4, batch=2, dtype=torch.float32).to(_device())
    A[1, 0, 0] = float("nan")
    U, S, Vh = triton_svd(A)
    check_svd(A[:1].cpu(), U[:1].cpu(), S[:1].cpu(), Vh[:1].cpu(), scale=4.0)
    assert torch.isnan(S[1]).all() and torch.isnan(U[1]).all() and torch.isnan(Vh[1]).all()
    U, S, Vh = triton_svd(torch.empty(0, 4, 3, device=_device()))
    assert U.shape == (0, 4, 3) and S.shape == (0, 3) and Vh.shape == (0, 3, 3)


def test_triton_large_matrix_fallback_keeps_the_contract(triton_svd):
    # Beyond the Jacobi kernel's sizes: LAPACK, with the same signs and per-matrix NaN isolation as
    # the CPU op (one NaN matrix must not fail the batch or spill into its neighbours).
    torch.manual_seed(15)
    A = torch.randn(3, 70, 66, dtype=torch.float64)
    A[1, 5, 7] = float("nan")
    U, S, Vh = (t.cpu() for t in triton_svd(A.to(_device()), 20))
    assert torch.isnan(U[1]).all() and torch.isnan(S[1]).all() and torch.isnan(Vh[1]).all()
    good = [0, 2]
    check_svd(A[good], U[good], S[good], Vh[good], 20)
    big = Vh[good].gather(-1, Vh[good].abs().argmax(-1, keepdim=True))
    assert (big > 0).all(), "largest entry of each right singular vector must be positive"
    Uc, Sc, Vhc = lk.batched_svd(A, 20)
    torch.testing.assert_close(Vh[good], Vhc[good])
    torch.testing.assert_close(U[good], Uc[good])


def test_triton_bad_input(triton_svd):
    with pytest.raises(ValueError, match="float32 or float64"):
        triton_svd(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank must be in"):
        triton_svd(torch.randn(3, 3), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_dispatch_and_grad():
    A = torch.randn(64, 16, 16, device="cuda", dtype=torch.float64, requires_grad=True)
    U, S, Vh = lk.batched_svd(A)
    check_svd(A.detach().cpu(), U.detach().cpu(), S.detach().cpu(), Vh.detach().cpu())
    S.sum().backward()
    assert torch.isfinite(A.grad).all()
    assert math.isfinite(float(A.grad.sum()))
