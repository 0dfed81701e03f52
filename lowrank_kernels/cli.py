"""`lowrank` command line: `lowrank bench ...` and `lowrank compress ...`.

Each subcommand lives with its feature and exposes `add_arguments(parser)` and `run(args)`;
this file only wires them up (imports are lazy so `lowrank --help` stays fast)."""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "bench": ("lowrank_kernels.benchmark.cli", "benchmark the kernels against dense and unfused convolutions"),
    "compress": ("lowrank_kernels.compress_cli", "decompose a saved model into low-rank layers"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    sub.required = True
    # Only the chosen subcommand's module is imported.
    chosen = next((a for a in argv if a in _SUBCOMMANDS), None)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(_SUBCOMMANDS[args.command][0]).run(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
