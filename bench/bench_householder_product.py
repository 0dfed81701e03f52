"""pytest-benchmark view of the householder suite: the same candidates as `lowrank bench householder`
(lowrank_kernels/benchmark/householder_product.py), 2 threads, one benchmark per candidate.

    pytest bench/bench_householder_product.py --benchmark-enable --benchmark-group-by=group

pytest-benchmark times candidates one after the other, so on a shared machine prefer
`lowrank bench householder`, which interleaves them and reports ratios. Without
--benchmark-enable (the project default) every candidate runs once as a smoke test, and the
lowrank results are checked against torch's. torch's fwd+bwd at 1152x256 takes seconds and is
left to `lowrank bench householder`."""

from __future__ import annotations

import pytest
import torch

from lowrank_kernels.benchmark import householder_product as suite

CASES = [
    (shape, mode, name)
    for shape in suite.SHAPES
    for mode in suite.MODES
    for name in suite.CANDIDATES
    if not (shape in suite.SLOW_SHAPES and mode == "fwd+bwd" and name != "lowrank")
]


@pytest.mark.parametrize("shape,mode,candidate", CASES)
def test_householder_suite(benchmark, shape, mode, candidate):
    fns = suite.make_candidates(shape, mode)
    benchmark.group = f"householder {mode} {shape}"
    result = benchmark(fns[candidate])
    if candidate == "lowrank" and not (shape in suite.SLOW_SHAPES and mode == "fwd+bwd"):
        expected = fns["torch"]()
        for got, ref in zip(result if mode == "fwd+bwd" else [result], expected if mode == "fwd+bwd" else [expected]):
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("candidate", [c for c in suite.NETWORK_CANDIDATES if c != "dense_reflectors"])
def test_cifar_network_training_step(benchmark, candidate):
    step = suite.make_network_candidates(batch=64, dense_reflectors=False)[candidate]
    benchmark.group = "CIFAR network, training step, batch 64"
    loss = benchmark(step)
    assert torch.isfinite(loss)
