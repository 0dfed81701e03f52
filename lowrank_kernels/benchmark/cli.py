"""`lowrank bench [suite] [options]`: run one benchmark suite (default: sep_conv), or report
on recorded results.

This module adds the options every suite shares (thread counts, output paths, `--record`,
`--report`) and the chosen suite's own options, then hands the parsed arguments to the
suite's `run`. Before `run` is called, `args.json` and `args.plot` are filled in with
concrete paths (under `--out-dir` unless given) and `args.threads` is a non-empty list of
thread counts; `args.record` is the data file to upsert into, or None.

`lowrank bench [suite] --report [DATA]` times nothing: it prints the headline tables of the
data file (default bench/results.csv; all suites unless one is named) and writes their plots
under `--out-dir`. A `.json` path instead re-prints one earlier sep_conv run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from . import DEFAULT_SUITE, SUITES, results

DEFAULT_OUT_DIR = Path("bench") / "out"


def _int_list(text: str) -> list[int]:
    """'1,8' -> [1, 8] (argparse type for list options)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def default_threads() -> list[int]:
    """Two threads (the configuration the recorded results compare), capped by the cores present."""
    return [max(1, min(2, os.cpu_count() or 1))]


def _load_suite(name: str) -> ModuleType:
    module_name = SUITES[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise SystemExit(
            f"lowrank bench: suite {name!r} is not available in this build ({module_name} is missing); "
            f"available suites: {', '.join(n for n in SUITES if _suite_present(n))}"
        ) from None


def _suite_present(name: str) -> bool:
    return importlib.util.find_spec(SUITES[name]) is not None


class _BenchArgumentParser(argparse.ArgumentParser):
    """Adds the chosen suite's own options just before parsing.

    Which options exist depends on the suite named on the command line, which only the
    parse sees (the top-level `lowrank` parser hands this parser its argument list)."""

    _suite_module: ModuleType | None = None

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        if self._suite_module is None:
            arg_list = list(sys.argv[1:] if args is None else args)
            name = next((a for a in arg_list if a in SUITES), DEFAULT_SUITE)
            self._suite_module = _load_suite(name)
            self._suite_module.add_arguments(self.add_argument_group(f"{name} suite options"))
        return super().parse_known_args(args, namespace)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite name and the options every suite shares; the suite's own options are added
    when the command line is parsed."""
    parser.__class__ = _BenchArgumentParser
    parser.add_argument(
        "suite",
        nargs="?",
        default=None,
        choices=list(SUITES),
        help=f"which benchmark suite to run (default: {DEFAULT_SUITE}; with --report: every suite)",
    )
    shared = parser.add_argument_group("options every suite shares")
    shared.add_argument(
        "--threads",
        type=_int_list,
        default=None,
        help="CPU thread counts, comma-separated (e.g. 1,2 for the scaling ratio); default: min(2, cores)",
    )
    shared.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"where the JSON and PNG go (default: {DEFAULT_OUT_DIR})"
    )
    shared.add_argument("--json", type=Path, default=None, help="JSON results path (default: OUT_DIR/SUITE-TIME.json)")
    shared.add_argument("--plot", type=Path, default=None, help="PNG plot path (default: OUT_DIR/SUITE-TIME.png)")
    shared.add_argument(
        "--record",
        type=Path,
        nargs="?",
        const=results.DEFAULT_DATA,
        default=None,
        metavar="DATA",
        help=f"upsert the medians and quartiles into the results data file (default: {results.DEFAULT_DATA})",
    )
    shared.add_argument(
        "--report",
        type=Path,
        nargs="?",
        const=results.DEFAULT_DATA,
        default=None,
        metavar="DATA",
        help=f"time nothing: print the headline tables of a results data file (default: {results.DEFAULT_DATA}) "
        "and write their plots to OUT_DIR/report/; a sep_conv run's .json re-prints that run",
    )
    shared.add_argument("--markdown", action="store_true", help="with --report: markdown tables")


def report(args: argparse.Namespace) -> int:
    """`--report`: the headline tables (and plots) of the results data file."""
    names = [args.suite] if args.suite is not None else [n for n in SUITES if _suite_present(n)]
    specs = {}
    for name in names:
        specs.update(_load_suite(name).REPORTS)
    try:
        text = results.report(args.report, specs, markdown=args.markdown, plot_dir=args.out_dir / "report")
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"lowrank bench: --report {args.report}: {e}") from None
    print(text, end="")
    return 0


def run(args: argparse.Namespace) -> int:
    """Resolve the shared options and run the chosen suite (or report)."""
    if args.report is not None and args.report.suffix != ".json":
        return report(args)
    if args.suite is None:
        args.suite = DEFAULT_SUITE
    if args.report is not None and args.suite != "sep_conv":
        raise SystemExit(f"lowrank bench: --report {args.report}: a .json run report exists for sep_conv only")
    module = _load_suite(args.suite)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.json is None:
        args.json = args.out_dir / f"{args.suite}-{stamp}.json"
    if args.plot is None:
        args.plot = args.out_dir / f"{args.suite}-{stamp}.png"
    if args.threads is None:
        args.threads = default_threads()
    torch.set_num_threads(max(args.threads))
    return module.run(args) or 0
