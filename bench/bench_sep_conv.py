"""pytest-benchmark view of the sep_conv suite: the same candidates as `lowrank bench sep_conv`
(lowrank_kernels/benchmark/sep_conv.py) on one VGG-16 layer per stage, batch 1, 2 threads,
one benchmark per candidate.

    pytest bench/bench_sep_conv.py --benchmark-enable            # time them (sequentially)
    pytest bench/bench_sep_conv.py --benchmark-enable -k conv1_2 --benchmark-group-by=param:layer

pytest-benchmark times candidates one after the other, so on a shared machine prefer
`lowrank bench`, which interleaves them and reports ratios. Without --benchmark-enable
(the project default) every candidate runs once as a smoke test and sep_conv's result is
checked against the unfused pair."""

from __future__ import annotations

import pytest

from lowrank_kernels.benchmark import sep_conv as suite

# One layer per VGG-16 stage (all twelve run in `lowrank bench`): keeps the default smoke run short.
LAYERS = [
    layer for layer in suite.NETS["vgg16"] if layer.name in ("conv1_2", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
]


@pytest.mark.parametrize("candidate", suite.CANDIDATES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
@pytest.mark.parametrize("mode", suite.MODES)
def test_sep_conv_suite(benchmark, mode, layer, candidate):
    fns = suite.make_candidates(layer, 1, mode=mode)
    benchmark.group = f"{mode} {layer.name} b1"
    benchmark.extra_info.update(
        dense_flops=suite.mode_flops(layer, 1, mode)[0],
        lowrank_flops=suite.mode_flops(layer, 1, mode)[1],
        flop_ratio=layer.flop_ratio,
    )
    result = benchmark(fns[candidate])
    if candidate.startswith("sep"):
        reference = fns["unfused_cl" if candidate == "sep_cl" else "unfused"]()
        assert suite.max_rel_error(result, reference) < 1e-3
