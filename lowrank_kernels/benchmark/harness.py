"""The one benchmark harness: interleaved timing, tables, JSON, plots and peak memory. Every
suite (`lowrank bench <suite>`) and every pytest-benchmark file in bench/ times through
`time_interleaved`.

Machines here are shared and noisy, so candidates are never timed one after the other:
each round runs every candidate once, in a fresh random order, and the medians over rounds
are compared as ratios."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call wall time of one candidate over the rounds of an interleaved run (milliseconds)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    rounds: int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 15,
    warmup: int = 2,
    min_round_s: float = 0.0,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Timing]:
    """Time each candidate `rounds` times, interleaved in a random order per round.

    `min_round_s` repeats a candidate within a round until that much time has passed
    (for sub-millisecond calls); the reported time is per call. On CUDA the device is
    synchronized around every timed call.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn = candidates[name]
            calls = 0
            start = time.perf_counter()
            while True:
                fn()
                calls += 1
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_round_s:
                    break
            samples[name].append(elapsed * 1e3 / calls)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        out[name] = Timing(statistics.median(s), q[0], q[2], min(s), len(s))
    return out


def machine_info() -> dict[str, Any]:
    """What a results file needs to say about where it was measured."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "loadavg_1_5_15min": load,
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = ".2f", *, markdown: bool = False
) -> str:
    """A plain-text table of `rows` restricted to `columns` (missing cells print as '-'); with
    `markdown`, a GitHub-flavoured markdown table of the same cells."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(out)
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _jsonable(o: Any) -> Any:
    return asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)


def save_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` (plus machine info) as JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info(), **payload}
    path.write_text(json.dumps(data, indent=2, default=_jsonable))
    return path


_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    # Hand freed heap pages back to the OS, so that memory a call allocates anew shows up
    # in the peak RSS instead of being recycled unseen from glibc's free lists.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_peak_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def peak_memory_mib(fn: Callable[[], Any], *, device: str = "cpu", repeats: int = 2) -> float | None:
    """Peak extra memory of one call of `fn` in MiB (the smallest over `repeats` calls).

    CPU: the process's peak resident set size during the call minus its size just before,
    read from /proc (the peak is reset through /proc/self/clear_refs). This sees every
    allocation - torch tensors, oneDNN scratch pads and a C++ kernel's own buffers - and
    counts the call's result too. Returns None where /proc does not offer this.
    CUDA: torch's allocator peak minus the memory allocated before the call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    best = None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = fn()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            if not _rss_peak_supported():
                return None
            _malloc_trim()
            _CLEAR_REFS.write_text("5")  # peak RSS := current RSS
            before = _status_kib("VmRSS")
            result = fn()
            extra = (_status_kib("VmHWM") - before) / 1024
        del result
        best = extra if best is None else min(best, extra)
    return max(best, 0.0)


@dataclass
class PlotPanel:
    """One panel of `plot_grouped_bars`: bars per group label, plus reference levels per group
    (drawn as short horizontal segments across each group, e.g. an ideal speedup)."""

    title: str
    labels: Sequence[str]
    bars: Mapping[str, Sequence[float | None]]
    levels: Mapping[str, Sequence[float | None]] = field(default_factory=dict)
    ylabel: str | None = None  # default: plot_grouped_bars' ylabel


def plot_grouped_bars(
    path: str | Path, panels: Sequence[PlotPanel], *, ylabel: str, title: str = "", ncols: int = 2
) -> Path:
    """Write a PNG with one grouped bar chart per panel (matplotlib, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("plot_grouped_bars needs at least one panel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(7.5 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    level_styles = [("black", "-"), ("tab:red", "--"), ("tab:gray", ":")]
    for ax, panel in zip(axes, panels):
        n = len(panel.labels)
        width = 0.8 / max(1, len(panel.bars))
        for i, (name, values) in enumerate(panel.bars.items()):
            xs = [g - 0.4 + width * (i + 0.5) for g in range(n)]
            ys = [float("nan") if v is None else v for v in values]
            ax.bar(xs, ys, width=width, label=name)
        for (name, values), (color, style) in zip(panel.levels.items(), level_styles):
            for g, v in enumerate(values):
                if v is not None:
                    ax.hlines(v, g - 0.45, g + 0.45, colors=color, linestyles=style, label=name if g == 0 else None)
        ax.set_xticks(range(n), list(panel.labels), rotation=45, ha="right")
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel or ylabel)
        ax.axhline(1.0, color="gray", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
