"""pytest-benchmark view of the svd suite: the same candidates as `lowrank bench svd`
(lowrank_kernels/benchmark/batched_svd.py) on smaller batches of the target shapes, 2 threads,
one benchmark per candidate.

    pytest bench/bench_batched_svd.py --benchmark-enable --benchmark-group-by=param:shape

pytest-benchmark times candidates one after the other, so on a shared machine prefer
`lowrank bench svd`, which interleaves them and reports ratios. Without --benchmark-enable
(the project default) every candidate runs once as a smoke test and its accuracy is checked."""

from __future__ import annotations

import pytest
import torch

from lowrank_kernels.benchmark import batched_svd as suite

SHAPES = [(1000, 8, 8), (1000, 16, 16), (256, 32, 32), (64, 64, 64)]


@pytest.mark.parametrize("candidate", suite.CANDIDATES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_svd_suite(benchmark, shape, candidate):
    A = suite.make_input(shape, torch.float32)
    benchmark.group = "x".join(map(str, shape))
    result = benchmark(suite.make_candidates(A)[candidate])
    errors = suite.accuracy(A, result, torch.linalg.svdvals(A.double()))
    benchmark.extra_info.update(errors)
    assert max(errors.values()) <= 1e-5
