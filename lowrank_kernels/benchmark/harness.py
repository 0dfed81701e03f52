"""The one benchmark harness: interleaved timing, tables, JSON. Every suite (`lowrank bench
<suite>`) and every pytest-benchmark file in bench/ times through `time_interleaved`.

Machines here are shared and noisy, so candidates are never timed one after the other:
each round runs every candidate once, in a fresh random order, and the medians over rounds
are compared as ratios."""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
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
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
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
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = ".2f") -> str:
    """A plain-text table of `rows` restricted to `columns` (missing cells print as '-')."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
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
