"""The sep_conv suite: fused `sep_conv` against dense convolution and the unfused pair.

Per layer and batch size, ONE interleaved run (`harness.time_interleaved`) times six candidates:

    dense       F.conv2d with the full d x d kernel (oneDNN on CPU, cuDNN on CUDA), NCHW input
    dense_cl    the same on channels_last input
    unfused     the two F.conv2d calls users run today (`_reference.sep_conv_reference`), NCHW
    unfused_cl  the same on channels_last input
    sep         `lowrank_kernels.sep_conv`, NCHW
    sep_cl      `lowrank_kernels.sep_conv`, channels_last

"_cl" candidates get channels_last activations (input, output, output gradient); weights
stay in their default layout for every candidate. In train mode each candidate runs
forward + backward and returns every gradient (input, weights, bias), through autograd.
Several thread counts (`--threads 1,2`) are interleaved in the same run, so their ratio
is as trustworthy as the others.

The default layer set is VGG-16's 3x3 layers at 224x224 with the ranks Tai et al. (2016)
released; conv1_1 (C=3, which Tai et al. leave dense) is not part of it.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._reference import sep_conv_reference
from . import harness, results

CANDIDATES = ("dense", "dense_cl", "unfused", "unfused_cl", "sep", "sep_cl")
SEP_FORMATS = {"sep": "NCHW", "sep_cl": "channels_last"}
MODES = ("forward", "train")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3
MIN_ROUND_S = 0.02  # repeat sub-20 ms calls within a round
# Largest max|a - b| / max|b| accepted between sep_conv and the unfused pair before the
# table flags the row: a benchmark of a wrong kernel means nothing.
_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class ConvLayer:
    """A d x d convolution (stride 1, 'same' padding) and the rank of its separable factorization."""

    name: str
    in_channels: int
    out_channels: int
    rank: int
    height: int
    width: int
    kernel: int = 3
    groups: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        shrink = self.kernel - 1 - 2 * self.padding
        return self.height - shrink, self.width - shrink

    def dense_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the dense forward (bias ignored)."""
        oh, ow = self.out_hw
        return 2 * batch * oh * ow * self.out_channels * (self.in_channels // self.groups) * self.kernel**2

    def lowrank_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the two factors' forward (bias ignored)."""
        oh, ow = self.out_hw
        d, g = self.kernel, self.groups
        vertical = batch * oh * self.width * self.rank * (self.in_channels // g) * d
        horizontal = batch * oh * ow * self.out_channels * (self.rank // g) * d
        return 2 * (vertical + horizontal)

    @property
    def flop_ratio(self) -> float:
        return self.dense_flops(1) / self.lowrank_flops(1)


def _vgg16() -> tuple[ConvLayer, ...]:
    # (name, C, N, Tai et al.'s rank, spatial size at 224x224 input)
    layers = [
        ("conv1_2", 64, 64, 24, 224),
        ("conv2_1", 64, 128, 48, 112),
        ("conv2_2", 128, 128, 48, 112),
        ("conv3_1", 128, 256, 64, 56),
        ("conv3_2", 256, 256, 128, 56),
        ("conv3_3", 256, 256, 160, 56),
        ("conv4_1", 256, 512, 192, 28),
        ("conv4_2", 512, 512, 192, 28),
        ("conv4_3", 512, 512, 256, 28),
        ("conv5_1", 512, 512, 320, 14),
        ("conv5_2", 512, 512, 320, 14),
        ("conv5_3", 512, 512, 320, 14),
    ]
    return tuple(ConvLayer(n, c, o, k, s, s) for n, c, o, k, s in layers)


def _depthwise() -> tuple[ConvLayer, ...]:
    # The spatial part of CP and Jaderberg scheme-1 layers: a depthwise 3x1 then 1x3 pair
    # (groups = C = K = N), against the dense depthwise 3x3 conv and the unfused depthwise pair.
    return tuple(ConvLayer(f"dw{c}_{s}", c, c, c, s, s, 3, c) for s in (56, 28) for c in (64, 128, 256))


NETS: dict[str, tuple[ConvLayer, ...]] = {"vgg16": _vgg16(), "depthwise": _depthwise()}

_SPEC = re.compile(r"^(?P<name>\w+):(?P<c>\d+)x(?P<n>\d+)r(?P<k>\d+)@(?P<h>\d+)(?:x(?P<w>\d+))?(?:k(?P<d>\d+))?$")


def parse_layers(spec: str | None, net: str = "vgg16") -> list[ConvLayer]:
    """Layers for `--layers`: comma-separated names from `net`, or custom layers written
    `NAME:CxNrK@H[xW][kD]` (e.g. `tiny:8x16r4@12x10k3`: 8 -> 16 channels, rank 4, 12x10 input,
    3x3 kernel). None means all layers of `net`."""
    if net not in NETS:
        raise ValueError(f"--net: unknown network {net!r}; choose from {', '.join(NETS)}")
    known = {layer.name: layer for layer in NETS[net]}
    if spec is None:
        return list(NETS[net])
    layers = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in known:
            layers.append(known[token])
            continue
        m = _SPEC.match(token)
        if m is None:
            raise ValueError(
                f"--layers: {token!r} is neither a {net} layer ({', '.join(known)}) nor a custom layer "
                "NAME:CxNrK@H[xW][kD] such as tiny:8x16r4@12x10k3"
            )
        h = int(m["h"])
        layer = ConvLayer(m["name"], int(m["c"]), int(m["n"]), int(m["k"]), h, int(m["w"] or h), int(m["d"] or 3))
        if min(layer.in_channels, layer.out_channels, layer.rank, layer.height, layer.width, layer.kernel) < 1:
            raise ValueError(f"--layers: every size in {token!r} must be positive")
        layers.append(layer)
    if not layers:
        raise ValueError("--layers: no layers given")
    return layers


def make_candidates(
    layer: ConvLayer,
    batch: int,
    *,
    mode: str = "forward",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Callable[[], Any]]:
    """The six candidates of one benchmark row as zero-argument callables.

    Forward candidates return the output; train candidates return the gradients
    (input, weight(s), bias) of forward + backward against a fixed output gradient."""
    import lowrank_kernels

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gen = torch.Generator().manual_seed(seed)
    c, n, k, d, g = layer.in_channels, layer.out_channels, layer.rank, layer.kernel, layer.groups

    def param(*shape: int, fan_in: int) -> torch.Tensor:
        # Unit-variance activations through the layer: no overflow and no denormals.
        t = torch.randn(*shape, generator=gen) / fan_in**0.5
        return t.to(device=device, dtype=dtype)

    x = param(batch, c, layer.height, layer.width, fan_in=1)
    weight = param(n, c // g, d, d, fan_in=c // g * d * d)
    weight_v = param(k, c // g, d, 1, fan_in=c // g * d)
    weight_h = param(n, k // g, 1, d, fan_in=k // g * d)
    bias = param(n, fan_in=1)
    train = mode == "train"
    for t in (x, weight, weight_v, weight_h, bias):
        t.requires_grad_(train)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(train)
    p = layer.padding
    grad_out = param(batch, n, *layer.out_hw, fan_in=1)

    def dense(inp: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inp, weight, bias, 1, p, 1, g)

    def unfused(inp: torch.Tensor) -> torch.Tensor:
        return sep_conv_reference(inp, weight_v, weight_h, bias, (1, 1), (p, p), (1, 1), g)

    def sep(inp: torch.Tensor) -> torch.Tensor:
        return lowrank_kernels.sep_conv(inp, weight_v, weight_h, bias, 1, p, 1, g)

    def bind(op: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor, params: tuple) -> Callable[[], Any]:
        if not train:
            return lambda: op(inp)
        wrt = (inp, *params, bias)
        go = grad_out.contiguous(memory_format=torch.channels_last if inp is x_cl else torch.contiguous_format)
        return lambda: torch.autograd.grad(op(inp), wrt, go)

    return {
        "dense": bind(dense, x, (weight,)),
        "dense_cl": bind(dense, x_cl, (weight,)),
        "unfused": bind(unfused, x, (weight_v, weight_h)),
        "unfused_cl": bind(unfused, x_cl, (weight_v, weight_h)),
        "sep": bind(sep, x, (weight_v, weight_h)),
        "sep_cl": bind(sep, x_cl, (weight_v, weight_h)),
    }


def max_rel_error(result: Any, reference: Any) -> float:
    """max |a - b| / max |b| over a tensor or a tuple of tensors (worst element)."""
    if isinstance(result, torch.Tensor):
        result, reference = (result,), (reference,)
    worst = 0.0
    for a, b in zip(result, reference, strict=True):
        a, b = a.detach().double(), b.detach().double()
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def mode_flops(layer: ConvLayer, batch: int, mode: str) -> tuple[int, int]:
    """(dense, low-rank) FLOPs of one call in `mode`: a training step is the forward plus the
    input-gradient and weight-gradient convolutions, 3x the forward (bias sums ignored)."""
    factor = 3 if mode == "train" else 1
    return factor * layer.dense_flops(batch), factor * layer.lowrank_flops(batch)


def _with_threads(fn: Callable[[], Any], threads: int | None) -> Callable[[], Any]:
    if threads is None:
        return fn

    def call() -> Any:
        torch.set_num_threads(threads)
        return fn()

    return call


def _key(name: str, threads: int | None) -> str:
    return name if threads is None else f"{name}@{threads}"


def measure_row(
    layer: ConvLayer,
    batch: int,
    *,
    mode: str,
    dtype: torch.dtype,
    device: str,
    threads: Sequence[int | None],
    rounds: int,
    warmup: int = 1,
    memory: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """One interleaved run of every candidate at every thread count, plus the correctness check
    and peak memory of one row; returns the row's record (also what goes into the JSON)."""
    fns = make_candidates(layer, batch, mode=mode, dtype=dtype, device=device, seed=seed)
    top = threads[-1]
    if top is not None:
        torch.set_num_threads(top)
    outputs = {name: fns[name]() for name in ("unfused", "unfused_cl", "sep", "sep_cl")}
    errors = {
        "sep": max_rel_error(outputs["sep"], outputs["unfused"]),
        "sep_cl": max_rel_error(outputs["sep_cl"], outputs["unfused_cl"]),
    }
    del outputs
    timed = {_key(name, t): _with_threads(fn, t) for t in threads for name, fn in fns.items()}
    wall, cpu = time.perf_counter(), time.process_time()
    timings = harness.time_interleaved(
        timed, rounds=rounds, warmup=warmup, min_round_s=MIN_ROUND_S, device=device, seed=seed
    )
    # Cores this process actually got while timing: far below the thread counts asked for
    # means other processes took the CPU and the row is noisy.
    cores_used = (time.process_time() - cpu) / (time.perf_counter() - wall)
    if top is not None:
        torch.set_num_threads(top)
    # Every candidate is warm after the rounds: one call shows its steady-state peak.
    mem = {name: harness.peak_memory_mib(fn, device=device, repeats=1) for name, fn in fns.items()} if memory else {}
    dense_flops, lowrank_flops = mode_flops(layer, batch, mode)
    intermediate = batch * layer.rank * layer.out_hw[0] * layer.width * torch.finfo(dtype).bits // 8
    output = batch * layer.out_channels * layer.out_hw[0] * layer.out_hw[1] * torch.finfo(dtype).bits // 8
    return {
        "layer": asdict(layer),
        "name": layer.name,
        "batch": batch,
        "mode": mode,
        "dense_flops": dense_flops,
        "lowrank_flops": lowrank_flops,
        "flop_ratio": dense_flops / lowrank_flops,
        "timings": timings,
        "cores_used": cores_used,
        "max_rel_error": errors,
        "check_tolerance": _CHECK_TOL[dtype],
        "peak_memory_mib": mem,
        "output_mib": output / 2**20,
        "intermediate_mib": intermediate / 2**20,
    }


def derived(row: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Per-row numbers at one thread count: ms, GFLOP/s, speedups, efficiency, spread."""
    timings = {name: row["timings"][_key(name, threads)] for name in CANDIDATES}
    ms = {name: t.median_ms for name, t in timings.items()}
    best_dense = min(ms["dense"], ms["dense_cl"])
    best_unfused = min(ms["unfused"], ms["unfused_cl"])
    ratio = row["flop_ratio"]
    out: dict[str, Any] = {"ms": ms, "best_dense_ms": best_dense, "best_unfused_ms": best_unfused}
    out["gflops"] = {
        name: (row["dense_flops"] if name.startswith("dense") else row["lowrank_flops"]) / (t * 1e6)
        for name, t in ms.items()
    }
    # How far apart the rounds were: the widest interquartile range of the row's candidates, in %
    # of that candidate's median (a noise indicator; the medians themselves vary less).
    out["spread_pct"] = max(100 * (t.q3_ms - t.q1_ms) / t.median_ms for t in timings.values())
    out["unfused_speedup"] = best_dense / best_unfused
    for sep in SEP_FORMATS:
        out[f"{sep}_speedup"] = best_dense / ms[sep]
        out[f"{sep}_vs_unfused"] = best_unfused / ms[sep]
        out[f"{sep}_efficiency"] = best_dense / ms[sep] / ratio
    return out


def thread_scaling(row: dict[str, Any], lo: int, hi: int) -> dict[str, float]:
    """time at `lo` threads / time at `hi` threads, per candidate."""
    t = row["timings"]
    return {name: t[_key(name, lo)].median_ms / t[_key(name, hi)].median_ms for name in CANDIDATES}


def measurements(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows' timings as data-file measurements (`results.make_records`): case `mode/layer`,
    one per candidate and thread count, with the FLOPs of one call."""
    out = []
    for r in rows:
        for key, timing in r["timings"].items():
            name, _, threads = key.partition("@")
            flops = r["dense_flops"] if name.startswith("dense") else r["lowrank_flops"]
            out.append(
                {
                    "case": f"{r['mode']}/{r['name']}",
                    "candidate": name,
                    "threads": int(threads) if threads else None,
                    "batch": r["batch"],
                    "timing": timing,
                    "flops": flops,
                }
            )
    return out


REPORTS = {
    "sep_conv": results.ReportSpec(
        candidates=CANDIDATES,
        ratios=(
            results.Ratio("sep x", ("dense", "dense_cl"), "sep"),
            results.Ratio("sep_cl x", ("dense", "dense_cl"), "sep_cl"),
            results.Ratio("sep/unf*", ("unfused", "unfused_cl"), "sep"),
            results.Ratio("sep_cl/unf*", ("unfused", "unfused_cl"), "sep_cl"),
        ),
        flop_ratio=("dense", "sep"),
        legend="case = mode/layer; ms = median per call (train: forward + backward, all gradients); "
        "x = speedup over the faster dense conv (NCHW or channels_last; ideal = FLOP ratio); "
        "/unf* = speedup over the faster unfused two-conv pair.",
    )
}


def _fmt(v: float | None, spec: str = ".2f") -> str | None:
    return None if v is None else format(v, spec)


def format_tables(rows: Sequence[dict[str, Any]], threads: int | None) -> str:
    """The two tables of one mode and thread count: times and GFLOP/s, then ratios and memory."""
    time_rows, ratio_rows = [], []
    for r in rows:
        d = derived(r, threads)
        lay = r["layer"]
        base = {"layer": r["name"], "B": r["batch"]}
        time_rows.append(
            {
                **base,
                "C>N": f"{lay['in_channels']}>{lay['out_channels']}",
                "K": lay["rank"],
                **{f"{n} ms": _fmt(d["ms"][n]) for n in CANDIDATES},
                "dense* GF/s": _fmt(max(d["gflops"]["dense"], d["gflops"]["dense_cl"]), ".1f"),
                "unf* GF/s": _fmt(max(d["gflops"]["unfused"], d["gflops"]["unfused_cl"]), ".1f"),
                "sep GF/s": _fmt(d["gflops"]["sep"], ".1f"),
                "sep_cl GF/s": _fmt(d["gflops"]["sep_cl"], ".1f"),
            }
        )
        mem = r["peak_memory_mib"]
        bad = [s for s, e in r["max_rel_error"].items() if not e <= r["check_tolerance"]]
        ratio_rows.append(
            {
                **base,
                "FLOP ratio": _fmt(r["flop_ratio"]),
                "unf* x": _fmt(d["unfused_speedup"]),
                "sep x": _fmt(d["sep_speedup"]),
                "sep_cl x": _fmt(d["sep_cl_speedup"]),
                "sep/unf*": _fmt(d["sep_vs_unfused"]),
                "sep_cl/unf*": _fmt(d["sep_cl_vs_unfused"]),
                "eff": _fmt(d["sep_efficiency"]),
                "eff_cl": _fmt(d["sep_cl_efficiency"]),
                **{f"MiB {n}": _fmt(mem.get(n), ".1f") for n in ("unfused", "unfused_cl", "sep", "sep_cl")},
                "MiB out": _fmt(r["output_mib"], ".1f"),
                "cores": _fmt(r.get("cores_used")),
                "IQR %": _fmt(d["spread_pct"], ".0f"),
                "check": "ok" if not bad else "WRONG " + ",".join(bad),
            }
        )
    return (
        harness.format_table(time_rows, list(time_rows[0]))
        + "\n\n"
        + harness.format_table(ratio_rows, list(ratio_rows[0]))
    )


LEGEND = """\
ms: median per call; * = the faster of NCHW and channels_last. GF/s: dense FLOPs for dense, low-rank FLOPs otherwise.
x: speedup over dense* (ideal = FLOP ratio); sep/unf*: sep_conv speedup over the best unfused pair;
eff: sep_conv GFLOP/s / dense* GFLOP/s (= x / FLOP ratio). MiB: peak extra memory of one call
(process peak RSS during the call minus before it, output included; MiB out = the output's size).
cores: CPU cores the process got while timing the row (CPU time / wall time). Undisturbed: about
the thread count (about 1.3-1.5 with --threads 1,2 interleaved); far below it = other processes
took the CPU and the row is noisy.
IQR %: the widest interquartile range over the rounds among the row's candidates, in % of that
candidate's median. High = the rounds disagreed and the row's ratios are less certain.
check: sep_conv's result against the unfused pair (max rel. error <= tolerance)."""


def format_thread_scaling(rows: Sequence[dict[str, Any]], lo: int, hi: int) -> str:
    table = []
    for r in rows:
        s = thread_scaling(r, lo, hi)
        table.append({"layer": r["name"], "B": r["batch"], **{f"{n} {hi}t/{lo}t": _fmt(s[n]) for n in CANDIDATES}})
    return harness.format_table(table, list(table[0]))


def _plot(path, rows: Sequence[dict[str, Any]], modes: Sequence[str], batches: Sequence[int], threads, title: str):
    at = 2 if 2 in threads else threads[-1]
    panels = []
    for mode in modes:
        for batch in batches:
            sel = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
            if not sel:
                continue
            ds = [derived(r, at) for r in sel]
            panels.append(
                harness.PlotPanel(
                    title=f"{mode}, batch {batch}" + (f", {at} threads" if at else ""),
                    labels=[r["name"] for r in sel],
                    bars={
                        "unfused pair (best format)": [d["unfused_speedup"] for d in ds],
                        "sep_conv NCHW": [d["sep_speedup"] for d in ds],
                        "sep_conv channels_last": [d["sep_cl_speedup"] for d in ds],
                    },
                    levels={"FLOP ratio (ideal)": [r["flop_ratio"] for r in sel]},
                )
            )
        if 1 in threads and 2 in threads:
            sel = [r for r in rows if r["mode"] == mode and r["batch"] == max(batches)]
            scale = [thread_scaling(r, 1, 2) for r in sel]
            panels.append(
                harness.PlotPanel(
                    title=f"{mode}, batch {max(batches)}: 2 threads / 1 thread",
                    labels=[r["name"] for r in sel],
                    bars={n: [s[n] for s in scale] for n in ("dense", "unfused", "sep", "sep_cl")},
                    levels={"ideal": [2.0] * len(sel)},
                    ylabel="time at 1 thread / time at 2 threads",
                )
            )
    return harness.plot_grouped_bars(path, panels, ylabel="speedup over dense conv (best format)", title=title)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sep_conv suite's own options (the CLI adds --threads and the output paths)."""
    parser.add_argument(
        "--net", default="vgg16", choices=list(NETS), help="which network's layers to run (default: vgg16)"
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names of --net, or custom layers NAME:CxNrK@H[xW][kD] (default: all)",
    )
    parser.add_argument(
        "--batch", type=_positive_ints, default=[1, 8], help="batch sizes, comma-separated (default: 1,8)"
    )
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="default: float32")
    parser.add_argument(
        "--mode",
        default="both",
        choices=[*MODES, "both"],
        help="forward only, forward+backward (all gradients), or both (default: both)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds per row (default {DEFAULT_ROUNDS}; {QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per candidate before the rounds (default: 1)"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds per row: a fast, noisier look")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="default: cuda if available",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data and round order (default: 0)")


def _positive_ints(text: str) -> list[int]:
    from .cli import _int_list

    return _int_list(text)


def run(args: argparse.Namespace) -> int:
    """Run the suite: progress while it runs, tables at the end, JSON + PNG (+ data file with --record)."""
    from tqdm import tqdm

    if args.report is not None:
        return _rerun_report(args)
    try:
        layers = parse_layers(args.layers, args.net)
    except ValueError as e:
        raise SystemExit(f"lowrank bench sep_conv: {e}") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lowrank bench sep_conv: --device cuda, but CUDA is not available")
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1 or args.warmup < 0:
        raise SystemExit("lowrank bench sep_conv: --rounds must be >= 1 and --warmup >= 0")
    dtype = DTYPES[args.dtype]
    load = harness.machine_info()["loadavg_1_5_15min"]
    modes = list(MODES) if args.mode == "both" else [args.mode]
    # CPU thread counts are interleaved within each row; on CUDA they do not apply.
    threads: list[int | None] = sorted(set(args.threads)) if args.device == "cpu" else [None]
    jobs = [(m, b, layer) for m in modes for b in args.batch for layer in layers]
    rows = []
    bar = tqdm(jobs, desc="sep_conv bench", unit="row", dynamic_ncols=True)
    for mode, batch, layer in bar:
        bar.set_postfix_str(f"{mode} {layer.name} b{batch}")
        row = measure_row(
            layer,
            batch,
            mode=mode,
            dtype=dtype,
            device=args.device,
            threads=threads,
            rounds=rounds,
            warmup=args.warmup,
            memory=not args.no_memory,
            seed=args.seed,
        )
        rows.append(row)
        d = derived(row, threads[-1])
        bar.write(
            f"{mode:7s} {layer.name:>8s} b{batch}: dense* {d['best_dense_ms']:.2f} ms, unfused* "
            f"{d['best_unfused_ms']:.2f} ms, sep {d['ms']['sep']:.2f} / sep_cl {d['ms']['sep_cl']:.2f} ms "
            f"(FLOP ratio {row['flop_ratio']:.2f}, sep x {d['sep_speedup']:.2f}, sep/unf* {d['sep_vs_unfused']:.2f}; "
            f"process got {row['cores_used']:.2f} cores)"
        )
    bar.close()

    _report(rows, modes, threads, args.dtype, args.device, args.net, rounds, load)
    json_path = harness.save_json(
        args.json,
        {
            "suite": "sep_conv",
            "args": {k: v if isinstance(v, int | float | list | None) else str(v) for k, v in vars(args).items()},
            "rounds": rounds,
            "loadavg_before": load,
            "candidates": CANDIDATES,
            "rows": [{**r, "derived": {str(t): derived(r, t) for t in threads}} for r in rows],
        },
    )
    title = f"sep_conv suite ({args.net}), {args.dtype}, {args.device}"
    plot_path = _plot(args.plot, rows, modes, args.batch, threads, title)
    print(f"\nwrote {json_path}\nwrote {plot_path}")
    results.record(args, results.make_records("sep_conv", measurements(rows), dtype=args.dtype, device=args.device))
    return 0


def _report(rows, modes, threads, dtype: str, device: str, net: str, rounds: int, load) -> None:
    """Print the tables and the legend."""
    dev = device if device != "cpu" else f"cpu, {harness.machine_info()['cpu']}"
    print(f"\nsep_conv suite ({net}), {dtype}, {dev}, {rounds} rounds per row")
    if load is not None:
        print(f"load average before the run (1/5/15 min): {load} on {os.cpu_count()} cores", end="")
        print(" - other processes were running: expect noise" if load[0] > 0.5 else "")
    print()
    for mode in modes:
        for t in threads:
            sel = [r for r in rows if r["mode"] == mode]
            print(f"== {mode}" + (f", {t} thread{'s' if t > 1 else ''}" if t else "") + " ==")
            print(format_tables(sel, t))
            print()
        if 1 in threads and 2 in threads:
            print(f"== {mode}: thread scaling (time at 1 thread / time at 2 threads) ==")
            print(format_thread_scaling([r for r in rows if r["mode"] == mode], 1, 2))
            print()
    print(LEGEND)


def _rerun_report(args: argparse.Namespace) -> int:
    """--report: the tables, summary and plot of an earlier run's JSON, without timing anything."""
    import json

    try:
        data = json.loads(args.report.read_text())
        rows = data["rows"]
        for r in rows:
            r["timings"] = {k: harness.Timing(**v) for k, v in r["timings"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"lowrank bench sep_conv: --report {args.report}: not a sep_conv results file ({e})") from None
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    keys = next(iter(rows))["timings"] if rows else {}
    threads = sorted({int(k.split("@")[1]) for k in keys if "@" in k}) or [None]
    old = data.get("args", {})
    dtype, device, net = old.get("dtype", "?"), old.get("device", "?"), old.get("net", "?")
    print(f"report of {args.report} (measured {data.get('machine', {}).get('date', '?')})")
    _report(rows, modes, threads, dtype, device, net, data.get("rounds", 0), data.get("loadavg_before"))
    plot_path = _plot(args.plot, rows, modes, batches, threads, f"sep_conv suite ({net}), {dtype}, {device}")
    print(f"\nwrote {plot_path}")
    return 0
