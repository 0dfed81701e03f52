"""The CPU ops under different thread counts, from two Python threads at once, and in a forked child
(as DataLoader workers run them: one thread, after the parent used the ops)."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels._reference import householder_product_reference, sep_conv_reference

from tolerances import assert_within, gamma, sum_bound, svd_backward_error

ARGS = ((1, 1), (1, 1), (1, 1), 2)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, 21, 19, generator=g).contiguous(memory_format=torch.channels_last)
    wv = torch.randn(12, 8, 3, 1, generator=g) / 24**0.5
    wh = torch.randn(20, 6, 1, 3, generator=g) / 18**0.5
    b = torch.randn(20, generator=g)
    A = torch.randn(40, 12, 9, generator=g)
    H = torch.randn(5, 14, 10, generator=g) / 14**0.5
    tau = 2 / (1 + H.tril(-1).pow(2).sum(-2))  # reflections: Q has orthonormal columns, |Q| <= 1
    return x, wv, wh, b, A, H, tau


def _run_ops(inputs):
    """Forward and backward of sep_conv, batched_svd, householder_product on float32 inputs."""
    x, wv, wh, b, A, H, tau = inputs
    leaves = [t.clone().requires_grad_() for t in (x, wv, wh, b)]
    out = lk.sep_conv(*leaves, *ARGS)
    out.backward(torch.ones_like(out))
    U, S, Vh = lk.batched_svd(A)
    Q = lk.householder_product(H, tau)
    return [out.detach(), *(t.grad for t in leaves), (U * S.unsqueeze(-2)) @ Vh, S, Q]


def _check(results, inputs):
    """Each result against the float64 references, within its rounding bound."""
    x, wv, wh, b, A, H, tau = inputs
    out, gx, gwv, gwh, gb, rec, S, Q = results
    as64 = [t.double().requires_grad_() for t in (x, wv, wh, b)]
    ref = sep_conv_reference(*as64, *ARGS)
    ref.backward(torch.ones_like(ref))
    absolute = [t.detach().abs().requires_grad_() for t in as64]
    mag = sep_conv_reference(*absolute, *ARGS)
    mag.backward(torch.ones_like(mag))
    assert_within(out, ref.detach(), sum_bound(mag.detach(), 8 * 3 + 6 * 3 + 1, torch.float32), "output")
    length = 3 * 21 * 19 + 8 * 3 + 6 * 3 + 10 * 3 + 1
    for name, g, r, m in zip(
        ("input", "weight_v", "weight_h", "bias"), (gx, gwv, gwh, gb), as64, absolute, strict=True
    ):
        assert_within(g, r.grad, sum_bound(m.grad, length, torch.float32), f"grad {name}")
    # SVD: A up to the backward error of a stable SVD, singular values within it (Weyl).
    A64 = A.double()
    norm = A64.flatten(-2).norm(dim=-1)
    err = svd_backward_error(torch.float32, 12, 9)
    assert ((rec.double() - A64).flatten(-2).norm(dim=-1) <= err * 9**0.5 * norm).all()
    assert ((S.double() - torch.linalg.svdvals(A64)).abs().amax(-1) <= err * norm).all()
    # 10 reflections of length 14 applied in float32: gamma_{14 * 10} per entry of |Q| <= 1.
    Q_ref = householder_product_reference(H.double(), tau.double())
    assert (Q.double() - Q_ref).abs().max() <= gamma(torch.float32, 14 * 10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    before = torch.get_num_threads()
    inputs = _inputs()
    try:
        torch.set_num_threads(threads)
        _check(_run_ops(inputs), inputs)
    finally:
        torch.set_num_threads(before)


def test_two_python_threads_at_once():
    inputs = [_inputs(seed) for seed in (1, 2)]
    results: list = [None, None]
    errors: list = []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(3):
                results[i] = _run_ops(inputs[i])
        except Exception as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a thread hung"
    assert not errors, errors
    for i in range(2):
        _check(results[i], inputs[i])


def _child(queue):
    torch.set_num_threads(1)  # what DataLoader workers do
    try:
        inputs = _inputs(3)
        _check(_run_ops(inputs), inputs)
        queue.put("ok")
    except BaseException as e:
        queue.put(repr(e))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_child_after_parent_used_the_ops():
    inputs = _inputs()
    _run_ops(inputs)  # the parent's thread pools and per-thread buffers exist before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail("forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=10) == "ok"
    _check(_run_ops(inputs), inputs)  # and the parent still works afterwards
