"""The householder suite: `householder_product` and orthogonal convolutions.

Part 1, per matrix shape and mode (forward / forward+backward), ONE interleaved run of:

    lowrank      `lowrank_kernels.householder_product` (blocked compact-WY, C++)
    torch        `torch.linalg.householder_product` (LAPACK orgqr forward, sequential backward)
    parametrize  `torch.nn.utils.parametrizations.orthogonal` on a weight of that shape
                 (its default map for non-square matrices calls torch.linalg.householder_product)

All three get the same reflectors (tau = 2 / |v|^2, so Q has orthonormal columns). torch's
backward for 1152x256 takes seconds, so that row runs `--slow-rounds` rounds (default 3) and
repeats the fast candidates within each round instead.

Part 2: one training step (forward, cross-entropy, backward, Adam) of a small VGG-like CIFAR
network (conv 5x5x3x32, conv 3x3x32x32, pool, conv 3x3x32x64, conv 3x3x64x64, pool,
fc 2304-512, fc 512-10; 32x32 inputs, batch 64), interleaved:

    plain             every conv an nn.Conv2d
    orthogonal        every conv a `lowrank_kernels.OrthogonalConv2d` (with bias)
    dense_reflectors  the naive construction of the same layer: n dense m x m reflectors
                      multiplied one by one (`_reference.dense_reflector_product_reference`),
                      --no-dense-reflectors to skip
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from .. import OrthogonalConv2d, householder_product
from .._reference import dense_reflector_product_reference
from . import harness, results

# name -> (m, n, batch dims)
SHAPES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "576x128": (576, 128, ()),
    "1152x256": (1152, 256, ()),
    "64x(64x32)": (64, 32, (64,)),
}
SLOW_SHAPES = ("1152x256",)  # torch's backward takes seconds here
MODES = ("forward", "fwd+bwd")
CANDIDATES = ("lowrank", "torch", "parametrize")
NETWORK_CANDIDATES = ("plain", "orthogonal", "dense_reflectors")
DEFAULT_ROUNDS = 9
MIN_ROUND_S = 0.05


def make_inputs(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(A, tau, grad) with tau = 2 / |v|^2, i.e. true reflections."""
    m, n, batch = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, m, n, generator=g, dtype=dtype) / m**0.5
    tau = 2 / (1 + a.tril(-1).pow(2).sum(-2))
    grad = torch.randn(*batch, m, n, generator=g, dtype=dtype)
    return a, tau, grad


class _Weight(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())


def make_candidates(shape: str, mode: str, dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], Any]]:
    """The three candidates for one shape; each returns Q (forward) or the gradients (fwd+bwd)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    a, tau, grad = make_inputs(shape, dtype)
    holder = _Weight(a)
    parametrizations.orthogonal(holder, "weight")
    original = holder.parametrizations.weight.original
    if mode == "forward":
        return {
            "lowrank": lambda: householder_product(a, tau),
            "torch": lambda: torch.linalg.householder_product(a, tau),
            "parametrize": lambda: holder.weight,
        }
    a_req, tau_req = a.clone().requires_grad_(), tau.clone().requires_grad_()

    def through(fn):
        def step():
            return torch.autograd.grad(fn(a_req, tau_req), (a_req, tau_req), grad)

        return step

    return {
        "lowrank": through(householder_product),
        "torch": through(torch.linalg.householder_product),
        "parametrize": lambda: torch.autograd.grad(holder.weight, original, grad),
    }


class _DenseReflectorConv2d(OrthogonalConv2d):
    """OrthogonalConv2d whose matrix is built from dense m x m reflectors multiplied one by one."""

    def matrix(self) -> torch.Tensor:
        return dense_reflector_product_reference(self.vectors * self._free)


def cifar_network(conv: str = "plain", num_classes: int = 10) -> nn.Sequential:
    """The VGG-like CIFAR network of part 2; `conv` is "plain", "orthogonal" or "dense_reflectors"."""
    layer = {"plain": nn.Conv2d, "orthogonal": OrthogonalConv2d, "dense_reflectors": _DenseReflectorConv2d}[conv]
    return nn.Sequential(
        layer(3, 32, 5, padding=2),
        nn.ReLU(),
        layer(32, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        layer(32, 64, 3, padding=1),
        nn.ReLU(),
        layer(64, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 6 * 64, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def make_network_candidates(batch: int = 64, dense_reflectors: bool = True) -> dict[str, Callable[[], Any]]:
    """One Adam training step per call for each network variant (same data)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out = {}
    for name in NETWORK_CANDIDATES:
        if name == "dense_reflectors" and not dense_reflectors:
            continue
        torch.manual_seed(0)
        net = cifar_network(name)
        opt = torch.optim.Adam(net.parameters(), lr=3e-4)

        def step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss

        out[name] = step
    return out


def _threads(args: argparse.Namespace) -> list[int]:
    return list(getattr(args, "threads", None) or [2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's own options (the shared ones come from benchmark/cli.py)."""
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds per row")
    parser.add_argument(
        "--slow-rounds", type=int, default=3, help="rounds for rows where torch's backward takes seconds (1152x256)"
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--skip-network", action="store_true", help="skip the training-step comparison")
    parser.add_argument(
        "--no-dense-reflectors", action="store_true", help="skip the network built from dense reflectors"
    )
    parser.add_argument("--batch", type=int, default=64, help="network batch size")


def _product_rows(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    rows = []
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"lowrank bench householder: unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        for mode in MODES:
            slow = shape in SLOW_SHAPES and mode == "fwd+bwd"
            rounds = args.slow_rounds if slow else args.rounds
            timings = harness.time_interleaved(
                make_candidates(shape, mode), rounds=rounds, warmup=1, min_round_s=MIN_ROUND_S * (4 if slow else 1)
            )
            row: dict[str, Any] = {"shape": shape, "mode": mode, "threads": threads, "rounds": rounds}
            for name in CANDIDATES:
                row[f"{name}_ms"] = timings[name].median_ms
            row["x_vs_torch"] = row["torch_ms"] / row["lowrank_ms"]
            row["x_vs_param"] = row["parametrize_ms"] / row["lowrank_ms"]
            row["timings"] = timings
            rows.append(row)
            print(harness.format_table([row], PRODUCT_COLUMNS), flush=True)
    return rows


PRODUCT_COLUMNS = (
    "shape",
    "mode",
    "threads",
    "rounds",
    "lowrank_ms",
    "torch_ms",
    "parametrize_ms",
    "x_vs_torch",
    "x_vs_param",
)
NETWORK_COLUMNS = (
    "batch",
    "threads",
    "rounds",
    "plain_ms",
    "orthogonal_ms",
    "dense_reflectors_ms",
    "ortho/plain",
    "dense_refl/plain",
)


def _network_row(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    candidates = make_network_candidates(args.batch, dense_reflectors=not args.no_dense_reflectors)
    timings = harness.time_interleaved(candidates, rounds=args.rounds, warmup=2)
    row: dict[str, Any] = {"batch": args.batch, "threads": threads, "rounds": args.rounds, "timings": timings}
    for name in candidates:
        row[f"{name}_ms"] = timings[name].median_ms
    row["ortho/plain"] = row["orthogonal_ms"] / row["plain_ms"]
    if "dense_reflectors_ms" in row:
        row["dense_refl/plain"] = row["dense_reflectors_ms"] / row["plain_ms"]
    return row


def measurements(product_rows: list[dict[str, Any]], network_rows: list[dict[str, Any]]) -> dict[str, list]:
    """Data-file measurements per data-file suite: products (case `mode/shape`) and the network's
    training step (case `train_step/cifar`)."""
    products = [
        {"case": f"{r['mode']}/{r['shape']}", "candidate": name, "threads": r["threads"], "batch": 1, "timing": t}
        for r in product_rows
        for name, t in r["timings"].items()
    ]
    network = [
        {"case": "train_step/cifar", "candidate": name, "threads": r["threads"], "batch": r["batch"], "timing": t}
        for r in network_rows
        for name, t in r["timings"].items()
    ]
    return {"householder": products, "householder_network": network}


REPORTS = {
    "householder": results.ReportSpec(
        candidates=CANDIDATES,
        ratios=(results.Ratio("x torch", ("torch",), "lowrank"), results.Ratio("x param", ("parametrize",), "lowrank")),
        legend="case = mode/shape; x = speedup of householder_product over torch.linalg.householder_product "
        "and over parametrizations.orthogonal.",
    ),
    "householder_network": results.ReportSpec(
        candidates=NETWORK_CANDIDATES,
        ratios=(
            results.Ratio("ortho/plain", ("orthogonal",), "plain"),
            results.Ratio("dense_refl/plain", ("dense_reflectors",), "plain"),
        ),
        legend="one training step (Adam) of the CIFAR network; a/plain = cost of the orthogonal layers "
        "relative to plain nn.Conv2d (below is better).",
    ),
}


def run(args: argparse.Namespace) -> int:
    """Run the suite, print the tables, save JSON (args.json, when given)."""
    product_rows, network_rows = [], []
    before = torch.get_num_threads()
    try:
        for threads in _threads(args):
            torch.set_num_threads(threads)
            print(f"householder_product, float32, {threads} thread(s), medians in ms:", flush=True)
            product_rows += _product_rows(args, threads)
            if not args.skip_network:
                network_rows.append(_network_row(args, threads))
    finally:
        torch.set_num_threads(before)
    print("\nhouseholder_product (float32; 1152x256 fwd+bwd uses --slow-rounds):")
    print(harness.format_table(product_rows, PRODUCT_COLUMNS))
    if network_rows:
        print("\ntraining step of the CIFAR network (batch, 32x32), medians in ms:")
        print(harness.format_table(network_rows, NETWORK_COLUMNS))
    for name, found in measurements(product_rows, network_rows).items():
        results.record(args, results.make_records(name, found, dtype="float32"))
    json_path = getattr(args, "json", None)
    if json_path:
        path = harness.save_json(json_path, {"suite": "householder", "products": product_rows, "network": network_rows})
        print(f"\nJSON: {path}")
    plot_path = getattr(args, "plot", None)
    if plot_path:
        panels = [
            harness.PlotPanel(
                title=f"householder_product {mode}",
                labels=[f"{r['shape']} {r['threads']}t" for r in product_rows if r["mode"] == mode],
                bars={
                    "vs torch.linalg.householder_product": [r["x_vs_torch"] for r in product_rows if r["mode"] == mode],
                    "vs parametrizations.orthogonal": [r["x_vs_param"] for r in product_rows if r["mode"] == mode],
                },
                levels={"1x": [1.0 for r in product_rows if r["mode"] == mode]},
            )
            for mode in dict.fromkeys(r["mode"] for r in product_rows)
        ]
        path = harness.plot_grouped_bars(plot_path, panels, ylabel="speedup (higher is better)", title="householder")
        print(f"plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m lowrank_kernels.benchmark.householder_product`): the
    suite's options plus --threads and --json, as `lowrank bench householder` provides them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[2])
    parser.add_argument("--json", default=None, help="JSON results path")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
