"""The svd suite: `batched_svd` against `torch.linalg.svd` and `torch.linalg.svdvals`.

Per batch shape and thread count, ONE interleaved run (`harness.time_interleaved`) times:

    batched_svd   lowrank_kernels.batched_svd(A)                (U, S, Vh; one-sided Jacobi)
    svd           torch.linalg.svd(A, full_matrices=False)      (LAPACK gesdd per matrix on CPU)
    svdvals       torch.linalg.svdvals(A)                       (singular values only)

and reports the speedups of batched_svd over both, plus accuracy columns for every result
against float64 LAPACK: relative reconstruction error max_b ||A - U S Vh||_F / ||A||_F,
orthogonality max_b ||U^T U - I||_F and ||Vh Vh^T - I||_F, and the singular-value error
max_b ||S - S_ref|| / ||A||_F. Several thread counts (`--threads 1,2`) are interleaved in
the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import batched_svd as _batched_svd
from . import harness, results

CANDIDATES = ("batched_svd", "svd", "svdvals")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_SHAPES = "10000x8x8,10000x16x16,4096x32x32,1024x64x64"
QUICK_SHAPES = "1000x8x8,1000x16x16,256x32x32,64x64x64"


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    """'10000x8x8,1024x64x32' -> [(10000, 8, 8), (1024, 64, 32)] (batch x m x n)."""
    shapes = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"svd suite: shape must look like BATCHxMxN with positive sizes, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def make_input(shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(tuple(shape), dtype=dtype, generator=torch.Generator().manual_seed(seed))


def make_candidates(A: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The three timed calls on the same input."""
    return {
        "batched_svd": lambda: _batched_svd(A),
        "svd": lambda: torch.linalg.svd(A, full_matrices=False),
        "svdvals": lambda: torch.linalg.svdvals(A),
    }


def accuracy(A: torch.Tensor, result: Any, S_ref: torch.Tensor) -> dict[str, float]:
    """Error columns of one result ((U, S, Vh) or S alone) against float64 singular values S_ref."""
    A64 = A.double()
    norm = A64.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    S = result if isinstance(result, torch.Tensor) else result[1]
    out = {"sv_err": ((S.double() - S_ref).norm(dim=-1) / norm).max().item()}
    if not isinstance(result, torch.Tensor):
        U, _, Vh = (t.double() for t in result)
        eye = torch.eye(U.shape[-1], dtype=torch.float64)
        rec = (U * S.double().unsqueeze(-2)) @ Vh
        out["rec_err"] = ((rec - A64).flatten(-2).norm(dim=-1) / norm).max().item()
        out["orth_u"] = (U.mT @ U - eye).flatten(-2).norm(dim=-1).max().item()
        out["orth_v"] = (Vh @ Vh.mT - eye).flatten(-2).norm(dim=-1).max().item()
    return out


def _with_threads(fn: Callable[[], Any], threads: int) -> Callable[[], Any]:
    def call() -> Any:
        torch.set_num_threads(threads)
        return fn()

    return call


def measure(
    shape: tuple[int, int, int], dtype: torch.dtype, threads: Sequence[int], rounds: int, warmup: int
) -> list[dict[str, Any]]:
    """One interleaved run for one shape over all candidates and thread counts -> one row per thread count."""
    A = make_input(shape, dtype)
    fns = make_candidates(A)
    S_ref = torch.linalg.svdvals(A.double())
    errors = {name: accuracy(A, fn(), S_ref) for name, fn in fns.items()}
    timed = {f"{name}@{t}": _with_threads(fn, t) for t in threads for name, fn in fns.items()}
    timings = harness.time_interleaved(timed, rounds=rounds, warmup=warmup, min_round_s=0.05)
    rows = []
    for t in threads:
        ms = {name: timings[f"{name}@{t}"].median_ms for name in CANDIDATES}
        row: dict[str, Any] = {
            "shape": "x".join(map(str, shape)),
            "dtype": str(dtype).replace("torch.", ""),
            "threads": t,
            **{f"{name}_ms": ms[name] for name in CANDIDATES},
            "x_vs_svd": ms["svd"] / ms["batched_svd"],
            "x_vs_svdvals": ms["svdvals"] / ms["batched_svd"],
            "us_per_matrix": ms["batched_svd"] * 1e3 / shape[0],
            "timings": {name: timings[f"{name}@{t}"] for name in CANDIDATES},
        }
        for name in ("batched_svd", "svd"):
            for key, value in errors[name].items():
                row[f"{key}:{name}"] = value
        row["sv_err:svdvals"] = errors["svdvals"]["sv_err"]
        rows.append(row)
    return rows


def measurements(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows' timings as data-file measurements: case `MxN`, batch = number of matrices."""
    out = []
    for r in rows:
        batch, m, n = r["shape"].split("x")
        for name, timing in r["timings"].items():
            out.append(
                {"case": f"{m}x{n}", "candidate": name, "threads": r["threads"], "batch": int(batch), "timing": timing}
            )
    return out


REPORTS = {
    "svd": results.ReportSpec(
        candidates=CANDIDATES,
        ratios=(
            results.Ratio("x svd", ("svd",), "batched_svd"),
            results.Ratio("x svdvals", ("svdvals",), "batched_svd"),
        ),
        legend="case = matrix shape, batch = matrices per call; x = speedup of batched_svd over "
        "torch.linalg.svd(full_matrices=False) and over torch.linalg.svdvals.",
    )
}


TABLE_COLUMNS = [
    "shape",
    "dtype",
    "threads",
    "batched_svd_ms",
    "svd_ms",
    "svdvals_ms",
    "x_vs_svd",
    "x_vs_svdvals",
    "us_per_matrix",
]
ACCURACY_COLUMNS = [
    "shape",
    "dtype",
    "rec_err:batched_svd",
    "orth_u:batched_svd",
    "orth_v:batched_svd",
    "sv_err:batched_svd",
    "rec_err:svd",
    "orth_u:svd",
    "orth_v:svd",
    "sv_err:svd",
    "sv_err:svdvals",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the svd suite."""
    parser.add_argument(
        "--shapes", default=None, help=f"comma-separated BATCHxMxN batch shapes (default: {DEFAULT_SHAPES})"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="element type (default: float32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first (default: 1)")
    parser.add_argument("--quick", action="store_true", help=f"small shapes ({QUICK_SHAPES}), 3 rounds: a smoke run")


def run(args: argparse.Namespace) -> int:
    """Run the suite; print the tables and the target verdicts; save JSON when args.json is set."""
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    dtype = DTYPES[args.dtype]
    threads = list(getattr(args, "threads", None) or [min(2, torch.get_num_threads())])
    rounds = 3 if args.quick else args.rounds
    rows: list[dict[str, Any]] = []
    try:
        from tqdm import tqdm
    except ImportError:  # progress display is optional

        def tqdm(it, **_):
            return it

    for shape in tqdm(shapes, desc="svd suite", unit="shape"):
        rows += measure(shape, dtype, threads, rounds, args.warmup)
    print(harness.machine_info())
    print("\nTime (median ms over interleaved rounds) and speedup of batched_svd:")
    print(harness.format_table(rows, TABLE_COLUMNS))
    print("\nAccuracy against float64 LAPACK (max over the batch):")
    print(harness.format_table([r for r in rows if r["threads"] == threads[0]], ACCURACY_COLUMNS, floatfmt=".1e"))
    results.record(args, results.make_records("svd", measurements(rows), dtype=args.dtype))
    if getattr(args, "json", None):
        path = harness.save_json(args.json, {"suite": "svd", "rows": rows})
        print(f"\nsaved {path}")
    if getattr(args, "plot", None):
        panels = [
            harness.PlotPanel(
                title=f"{args.dtype}, {t} thread(s)",
                labels=[r["shape"] for r in rows if r["threads"] == t],
                bars={
                    "vs torch.linalg.svd": [r["x_vs_svd"] for r in rows if r["threads"] == t],
                    "vs torch.linalg.svdvals": [r["x_vs_svdvals"] for r in rows if r["threads"] == t],
                },
                levels={"1x": [1.0 for r in rows if r["threads"] == t]},
            )
            for t in threads
        ]
        path = harness.plot_grouped_bars(args.plot, panels, ylabel="speedup of batched_svd", title="svd suite")
        print(f"saved {path}")
    return 0
