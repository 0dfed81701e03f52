"""Benchmark results as data: one CSV file of medians and quartiles, upserted by `--record`,
rendered as tables and plots by `lowrank bench --report`.

One row per (suite, case, candidate, dtype, device, threads, batch, cpu, isa, gpu): a new
measurement of the same key replaces the old one, so the file holds the latest figure of
every configuration on every machine, and git keeps the history. Rows carry the torch
version, the git commit and the date of their measurement.

Each suite module declares a `REPORT` (`ReportSpec`): which candidates to show, and which
ratios of their medians are the headline (e.g. the best dense time over sep_conv's)."""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import harness

DEFAULT_DATA = Path("bench") / "results.csv"
KEY = ("suite", "case", "candidate", "dtype", "device", "threads", "batch", "cpu", "isa", "gpu")
COLUMNS = (*KEY, "median_ms", "q1_ms", "q3_ms", "rounds", "flops", "torch", "commit", "date")
_MACHINE = ("cpu", "isa", "gpu")
_GROUP = (*_MACHINE, "device", "dtype", "threads")


@dataclass(frozen=True)
class Ratio:
    """A headline column: min over `baselines` of their medians / the median of `candidate`
    (above 1 = `candidate` is faster)."""

    column: str
    baselines: tuple[str, ...]
    candidate: str


@dataclass(frozen=True)
class ReportSpec:
    """How `--report` shows one suite: candidate columns (ms), ratio columns, and optionally the
    FLOP ratio of two candidates (from the recorded FLOP counts) as the plot's ideal level."""

    candidates: tuple[str, ...]
    ratios: tuple[Ratio, ...]
    flop_ratio: tuple[str, str] | None = None
    legend: str = ""


# ---- writing ---------------------------------------------------------------------------


def git_commit(where: str | Path | None = None) -> str:
    """Short commit hash of the checkout holding this package ('+dirty' with local changes to
    tracked files); empty outside a git checkout."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def machine_key(device: str = "cpu") -> dict[str, str]:
    """cpu model, ISA torch dispatches to (torch.backends.cpu.get_cpu_capability()) and, on CUDA
    runs, the GPU's name."""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else ""
    return {"cpu": harness.machine_info()["cpu"], "isa": torch.backends.cpu.get_cpu_capability(), "gpu": gpu}


def make_records(
    suite: str,
    measurements: Iterable[Mapping[str, Any]],
    *,
    dtype: str,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Data-file rows from a suite's measurements. Each measurement gives case, candidate,
    threads, batch, a `harness.Timing` as `timing`, and optionally flops (of one call)."""
    common = {
        "suite": suite,
        "dtype": dtype,
        "device": device,
        **machine_key(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    out = []
    for m in measurements:
        t: harness.Timing = m["timing"]
        out.append(
            {
                **common,
                "case": m["case"],
                "candidate": m["candidate"],
                "threads": m.get("threads") or "",
                "batch": m.get("batch", 1),
                "median_ms": t.median_ms,
                "q1_ms": t.q1_ms,
                "q3_ms": t.q3_ms,
                "rounds": t.rounds,
                "flops": m.get("flops", ""),
            }
        )
    return out


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, ".6g")
    return str(v)


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(_cell(row.get(k)) for k in KEY)


def load(path: str | Path) -> list[dict[str, str]]:
    """The rows of a data file (strings, as stored); ValueError if it is not one."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not a results file (missing columns {', '.join(missing)})")
        return list(reader)


def upsert(path: str | Path, records: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """Insert `records` into the data file at `path` (created if absent), replacing rows with the
    same key. Rows are kept sorted by key, so a re-run changes only the lines it measured.
    Returns (rows added, rows replaced)."""
    path = Path(path)
    rows = {_key(r): {c: r.get(c, "") for c in COLUMNS} for r in load(path)} if path.exists() else {}
    added = replaced = 0
    for r in records:
        key = _key(r)
        replaced += key in rows
        added += key not in rows
        rows[key] = {c: _cell(r.get(c)) for c in COLUMNS}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows, key=_sort_key))
    return added, replaced


def _sort_key(key: tuple[str, ...]) -> tuple:
    # Numbers sort as numbers (threads, batch), the rest as text.
    return tuple((0, int(v), "") if v.isdigit() else (1, 0, v) for v in key)


def record(args: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """Upsert into args.record when `--record` was given (a suite calls this after its run)."""
    path = getattr(args, "record", None)
    if path is None or not records:
        return
    added, replaced = upsert(path, records)
    print(f"recorded {len(records)} rows in {path} ({added} new, {replaced} replaced)")


# ---- reading ---------------------------------------------------------------------------


def _float(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _batch_sort(v: str) -> tuple:
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def headline_rows(rows: Sequence[Mapping[str, str]], spec: ReportSpec) -> list[dict[str, Any]]:
    """One table row per (case, batch) of one group: each candidate's median, the FLOP ratio, the
    spec's ratios, and the widest interquartile range among the candidates in % of its median."""
    by_case: dict[tuple[str, str], dict[str, Mapping[str, str]]] = {}
    for r in rows:
        by_case.setdefault((r["case"], r["batch"]), {})[r["candidate"]] = r
    out = []
    for (case, batch), cands in sorted(by_case.items(), key=lambda kv: (kv[0][0].split("/")[0], _batch_sort(kv[0][1]))):
        ms = {c: _float(r["median_ms"]) for c, r in cands.items()}
        row: dict[str, Any] = {"case": case, "batch": batch}
        row.update({f"{c} ms": ms.get(c) for c in spec.candidates})
        if spec.flop_ratio:
            a, b = (_float(cands[c]["flops"]) if c in cands else None for c in spec.flop_ratio)
            row["FLOP ratio"] = a / b if a and b else None
        for ratio in spec.ratios:
            base = [ms[c] for c in ratio.baselines if ms.get(c)]
            own = ms.get(ratio.candidate)
            row[ratio.column] = min(base) / own if base and own else None
        spreads = [
            (_float(r["q3_ms"]) - _float(r["q1_ms"])) / _float(r["median_ms"])
            for r in cands.values()
            if _float(r["q1_ms"]) is not None and _float(r["q3_ms"]) is not None and _float(r["median_ms"])
        ]
        row["IQR %"] = 100 * max(spreads) if spreads else None
        out.append(row)
    return out


def groups(rows: Sequence[Mapping[str, str]]) -> dict[tuple[str, ...], list[Mapping[str, str]]]:
    """Rows by (suite, cpu, isa, gpu, device, dtype, threads)."""
    out: dict[tuple[str, ...], list[Mapping[str, str]]] = {}
    for r in rows:
        out.setdefault((r["suite"], *(r[k] for k in _GROUP)), []).append(r)
    return out


def _title(group: tuple[str, ...]) -> str:
    suite, cpu, isa, gpu, device, dtype, threads = group
    where = f"{gpu} (host {cpu})" if gpu else f"{cpu}" + (f", {isa}" if isa else "")
    th = "" if not threads else f", {threads} thread{'s' if threads != '1' else ''}"
    return f"{suite}: {where}, {device}, {dtype}{th}"


def _provenance(rows: Sequence[Mapping[str, str]]) -> str:
    def values(k: str) -> str:
        vs = sorted({r[k] for r in rows if r[k]})
        return ", ".join(vs) if vs else "not recorded"

    dates = sorted(r["date"] for r in rows)
    return f"torch {values('torch')}; commit {values('commit')}; measured {dates[0]} to {dates[-1]} UTC"


def report(
    path: str | Path,
    specs: Mapping[str, ReportSpec],
    *,
    suites: Sequence[str] | None = None,
    markdown: bool = False,
    plot_dir: str | Path | None = None,
) -> str:
    """The headline tables of the data file at `path` (every suite in `specs`, or `suites`), one
    per machine, device, dtype and thread count; with `plot_dir`, one PNG per table there."""
    rows = load(path)
    chosen = [s for s in specs if suites is None or s in suites]
    parts = []
    for group, sel in sorted(groups(rows).items()):
        suite = group[0]
        if suite not in chosen:
            continue
        spec = specs[suite]
        table = headline_rows(sel, spec)
        columns = list(table[0])
        text = harness.format_table(table, columns, markdown=markdown)
        title = _title(group)
        head = f"### {title}\n\n{_provenance(sel)}\n\n" if markdown else f"== {title} ==\n{_provenance(sel)}\n"
        parts.append(head + text + "\n")
        if plot_dir is not None:
            png = _plot(Path(plot_dir), group, table, spec)
            parts.append(f"plot: {png}\n")
    for suite in chosen:
        if specs[suite].legend and any(g[0] == suite for g in groups(rows)):
            parts.append(f"{suite}: {specs[suite].legend}\n")
    if not parts:
        wanted = ", ".join(chosen) or "none"
        return f"{path}: no rows for suite(s) {wanted}\n"
    return "\n".join(parts)


def _plot(plot_dir: Path, group: tuple[str, ...], table: Sequence[Mapping[str, Any]], spec: ReportSpec) -> Path:
    """Bars of the ratio columns per case, one panel per case prefix (the part before '/')."""
    panels = []
    prefixes = list(dict.fromkeys(str(r["case"]).split("/")[0] if "/" in str(r["case"]) else "" for r in table))
    for prefix in prefixes:
        sel = [r for r in table if (str(r["case"]).split("/")[0] if "/" in str(r["case"]) else "") == prefix]
        labels = [f"{str(r['case']).split('/')[-1]} b{r['batch']}" for r in sel]
        levels = {"FLOP ratio (ideal)": [r.get("FLOP ratio") for r in sel]} if spec.flop_ratio else {}
        panels.append(
            harness.PlotPanel(
                title=prefix or group[0],
                labels=labels,
                bars={ratio.column: [r[ratio.column] for r in sel] for ratio in spec.ratios},
                levels=levels,
            )
        )
    name = "-".join(part.replace(" ", "_").replace("/", "_") for part in group if part)
    name = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in name)
    return harness.plot_grouped_bars(
        plot_dir / f"{name}.png", panels, ylabel="ratio (above 1: faster)", title=_title(group)
    )
