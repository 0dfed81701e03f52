"""Regenerate the generated sections of bench/RESULTS.md from bench/results.csv.

A generated section sits between two marker lines naming the command whose output it holds:

    <!-- generated: lowrank bench sep_conv --report --markdown -->
    ...
    <!-- end generated -->

    python bench/update_results_md.py [--check]

--check exits 1 (changing nothing) when a section differs from what the data file gives."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lowrank_kernels.cli import main as lowrank  # noqa: E402

SECTION = re.compile(r"(<!-- generated: (?P<cmd>lowrank [^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


@contextlib.contextmanager
def _in_root():
    before = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def render(command: str) -> str:
    """The output of a `lowrank ...` command (the report's plots go to a scratch folder)."""
    argv = shlex.split(command)[1:]
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as scratch, _in_root(), contextlib.redirect_stdout(out):
        lowrank([*argv, "--out-dir", scratch])
    text = "\n".join(line for line in out.getvalue().splitlines() if not line.startswith("plot: "))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def update(text: str) -> str:
    return SECTION.sub(lambda m: m.group(1) + "\n" + render(m["cmd"]) + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--check", action="store_true", help="only report whether the page is current")
    args = parser.parse_args(argv)
    old = args.path.read_text()
    new = update(old)
    if args.check:
        print(f"{args.path}: {'current' if new == old else 'out of date (run bench/update_results_md.py)'}")
        return 0 if new == old else 1
    args.path.write_text(new)
    print(f"{args.path}: {len(SECTION.findall(old))} generated sections rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
