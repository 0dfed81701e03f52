"""The project's pass/fail goals for the CPU kernels, checked on the JSON of a benchmark run.

The benchmark suites (`lowrank bench`) report times and ratios only; the thresholds live here:

    lowrank bench sep_conv --threads 1,2 --json bench/out/run.json
    python bench/targets.py bench/out/run.json [more.json ...]

sep_conv goals (float32, 2 threads; a run without 2 threads is judged at its largest count):
sep_conv against the faster unfused two-conv pair, efficiency (speedup over the faster dense
conv / FLOP ratio) and, when the run has 1 and 2 threads, the 2-thread speedup at batch 8.
svd goals: batched_svd's speedup over torch.linalg.svd on the default shapes (float32,
2 threads) and its worst reconstruction/orthogonality error. Exit status 1 if a goal fails."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lowrank_kernels.benchmark import harness  # noqa: E402
from lowrank_kernels.benchmark import sep_conv as sep_conv_suite  # noqa: E402


@dataclass
class Target:
    """`metric` (a `sep_conv.derived` key without its format prefix, or 'scaling') >= `need` on
    the rows `applies` selects."""

    mode: str
    text: str
    metric: str
    need: float
    applies: Callable[[dict[str, Any]], bool] = lambda row: True


SEP_CONV_TARGETS = (
    Target("forward", "sep_conv / best unfused pair, every layer", "vs_unfused", 0.95),
    Target("forward", "sep_conv / best unfused pair, conv1_2", "vs_unfused", 1.5, lambda r: r["name"] == "conv1_2"),
    Target(
        "forward",
        "sep_conv / best unfused pair, conv2_1+conv2_2 b8",
        "vs_unfused",
        1.25,
        lambda r: r["name"] in ("conv2_1", "conv2_2") and r["batch"] == 8,
    ),
    Target("forward", "efficiency = speedup over dense / FLOP ratio", "efficiency", 0.85),
    Target("train", "sep_conv / best unfused pair, every layer", "vs_unfused", 1.0),
    Target("train", "efficiency = speedup over dense / FLOP ratio", "efficiency", 0.6),
    Target("forward", "2 threads / 1 thread at batch 8", "scaling", 1.7, lambda r: r["batch"] == 8),
    Target("train", "2 threads / 1 thread at batch 8", "scaling", 1.7, lambda r: r["batch"] == 8),
)

# (batch, m, n) -> speedup of batched_svd over torch.linalg.svd needed (float32, 2 threads)
SVD_SPEED_TARGETS = {(10000, 8, 8): 10.0, (10000, 16, 16): 10.0, (4096, 32, 32): 10.0, (1024, 64, 64): 5.0}
# dtype -> largest reconstruction / orthogonality error of batched_svd accepted
SVD_ACCURACY_TARGETS = {"float32": 1e-5, "float64": 1e-12}


def evaluate_sep_conv(rows: Sequence[dict[str, Any]], threads: Sequence[int | None]) -> list[dict[str, Any]]:
    """Per target and sep_conv memory format: the min and median over the rows it applies to,
    PASS/FAIL, and the worst failing rows (every value is in the result's "values")."""
    at = 2 if 2 in threads else threads[-1]
    out = []
    for target in SEP_CONV_TARGETS:
        if target.metric == "scaling" and not (1 in threads and 2 in threads):
            continue
        chosen = [r for r in rows if r["mode"] == target.mode and target.applies(r)]
        if not chosen:
            continue
        for sep, fmt in sep_conv_suite.SEP_FORMATS.items():
            values = []
            for r in chosen:
                if target.metric == "scaling":
                    v = sep_conv_suite.thread_scaling(r, 1, 2)[sep]
                else:
                    v = sep_conv_suite.derived(r, at)[f"{sep}_{target.metric}"]
                values.append((f"{r['name']}/b{r['batch']}", v))
            failing = sorted((v, label) for label, v in values if v < target.need)
            shown = ", ".join(f"{label} {v:.2f}" for v, label in failing[:3])
            if len(failing) > 3:
                shown += f" (+{len(failing) - 3} more)"
            out.append(
                {
                    "mode": target.mode,
                    "target": target.text,
                    "format": fmt,
                    "threads": "1->2" if target.metric == "scaling" else at,
                    "need": target.need,
                    "min": min(v for _, v in values),
                    "median": statistics.median(v for _, v in values),
                    "rows": len(values),
                    "result": "PASS" if not failing else "FAIL",
                    "failing": shown or "-",
                    "values": dict(values),
                }
            )
    return out


def evaluate_svd(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy on every row; speed on the rows of the default shapes at float32 and 2 threads."""
    out = []
    for r in rows:
        shape = tuple(int(v) for v in r["shape"].split("x"))
        tol = SVD_ACCURACY_TARGETS[r["dtype"]]
        worst = max(r["rec_err:batched_svd"], r["orth_u:batched_svd"], r["orth_v:batched_svd"])
        ok = worst <= tol
        verdict: dict[str, Any] = {"shape": r["shape"], "dtype": r["dtype"], "threads": r["threads"]}
        verdict |= {"worst_err": worst, "accuracy": "ok" if ok else f"FAIL (> {tol:g})", "speed": "-"}
        if shape in SVD_SPEED_TARGETS and r["dtype"] == "float32" and r["threads"] == 2:
            need = SVD_SPEED_TARGETS[shape]
            fast = r["x_vs_svd"] >= need
            ok = ok and fast
            verdict["speed"] = f"{'ok' if fast else 'FAIL'} ({r['x_vs_svd']:.1f}x, need {need:g}x)"
        verdict["result"] = "PASS" if ok else "FAIL"
        out.append(verdict)
    return out


def check_file(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(printable table, verdicts) of one run's JSON."""
    data = json.loads(path.read_text())
    suite = data.get("suite")
    if suite == "sep_conv":
        rows = data["rows"]
        for r in rows:
            r["timings"] = {k: harness.Timing(**v) for k, v in r["timings"].items()}
        keys = rows[0]["timings"] if rows else {}
        threads = sorted({int(k.split("@")[1]) for k in keys if "@" in k}) or [None]
        verdicts = evaluate_sep_conv(rows, threads)
        columns = ["mode", "target", "format", "threads", "rows", "min", "median", "need", "result", "failing"]
        dtype = data.get("args", {}).get("dtype", "float32")
        note = "" if dtype == "float32" else f" (the goals are set for float32; this run is {dtype})"
        return f"{path}: sep_conv goals{note}\n" + harness.format_table(verdicts, columns), verdicts
    if suite == "svd":
        verdicts = evaluate_svd(data["rows"])
        columns = ["shape", "dtype", "threads", "worst_err", "accuracy", "speed", "result"]
        return f"{path}: svd goals\n" + harness.format_table(verdicts, columns, ".1e"), verdicts
    raise ValueError(f"{path}: no goals for suite {suite!r} (sep_conv and svd runs have goals)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by lowrank bench --json")
    args = parser.parse_args(argv)
    failed = False
    for path in args.runs:
        try:
            text, verdicts = check_file(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"bench/targets.py: {path}: {e}") from None
        print(text, end="\n\n")
        failed |= any(v["result"] == "FAIL" for v in verdicts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
