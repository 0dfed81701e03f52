"""Benchmark suites behind `lowrank bench [suite]`.

Each suite is a module with `add_arguments(parser)` and `run(args) -> int` that times through
`harness.time_interleaved` and prints/saves with the harness helpers. The CLI (benchmark/cli.py)
adds the options every suite shares (threads, output paths) before calling the suite."""

SUITES = {
    "sep_conv": "lowrank_kernels.benchmark.sep_conv",
    "svd": "lowrank_kernels.benchmark.batched_svd",
    "householder": "lowrank_kernels.benchmark.householder_product",
    "model": "lowrank_kernels.benchmark.model",
}
DEFAULT_SUITE = "sep_conv"
