"""The benchmark harness and `lowrank bench`: interleaving, tables, JSON, plots, peak memory,
FLOP counts (against torch's own FlopCounterMode) and suite selection. Tiny layers only;
nothing here asserts a timing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import lowrank_kernels  # noqa: F401  (registers the ops)
from lowrank_kernels import benchmark
from lowrank_kernels.benchmark import harness
from lowrank_kernels.benchmark import sep_conv as suite
from lowrank_kernels.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = "tiny:6x10r3@9x11"


# ---- harness ---------------------------------------------------------------------------


def test_time_interleaved_runs_every_candidate_once_per_round():
    calls: list[str] = []
    names = ["a", "b", "c"]
    timings = harness.time_interleaved({n: (lambda n=n: calls.append(n)) for n in names}, rounds=5, warmup=2)
    warm, timed = calls[:6], calls[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]
    assert len(timed) == 15
    for r in range(5):
        assert sorted(timed[3 * r : 3 * r + 3]) == names
    assert len({tuple(timed[3 * r : 3 * r + 3]) for r in range(5)}) > 1  # the order is shuffled
    for t in timings.values():
        assert t.rounds == 5
        assert 0 <= t.min_ms <= t.q1_ms <= t.median_ms <= t.q3_ms


class _FakeClock:
    """perf_counter stand-in: each candidate call advances it by a known amount."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_interleaved_min_round_time_reports_per_call(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    count = {"n": 0}

    def fn():  # 1 ms per call
        count["n"] += 1
        clock.now += 1e-3

    t = harness.time_interleaved({"f": fn}, rounds=2, warmup=0, min_round_s=0.0045)
    assert count["n"] == 10  # repeated within each round until 4.5 ms passed: 5 calls a round
    assert t["f"].median_ms == pytest.approx(1.0)  # per call, not per round
    assert t["f"].rounds == 2


def test_time_interleaved_statistics_from_known_durations(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    durations = iter([3.0, 1.0, 4.0, 1.0, 5.0])  # ms, one per round

    def fn():
        clock.now += next(durations) * 1e-3

    t = harness.time_interleaved({"f": fn}, rounds=5, warmup=0)["f"]
    assert (t.min_ms, t.median_ms) == pytest.approx((1.0, 3.0))
    assert (t.q1_ms, t.q3_ms) == pytest.approx((1.0, 4.0))


def test_time_interleaved_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds"):
        harness.time_interleaved({"f": lambda: None}, rounds=0)


def test_format_table_aligns_and_marks_missing_cells():
    text = harness.format_table([{"a": 1.234, "b": "x"}, {"a": None}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b"]
    assert lines[2].split() == ["1.23", "x"]
    assert lines[3].split() == ["-", "-"]
    assert len({len(line) for line in lines}) == 1


def test_save_json_adds_machine_info_and_serializes_timings(tmp_path):
    t = harness.time_interleaved({"f": lambda: None}, rounds=2, warmup=0)
    path = harness.save_json(tmp_path / "sub" / "r.json", {"timings": t})
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert set(data["timings"]["f"]) == {"median_ms", "q1_ms", "q3_ms", "min_ms", "rounds"}


def test_plot_grouped_bars_writes_png(tmp_path):
    panel = harness.PlotPanel("p", ["l1", "l2"], {"x": [1.0, None], "y": [2.0, 3.0]}, {"ideal": [4.0, 4.0]})
    path = harness.plot_grouped_bars(tmp_path / "p.png", [panel, panel, panel], ylabel="speedup")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        harness.plot_grouped_bars(tmp_path / "q.png", [], ylabel="")


_proc_peak = pytest.mark.skipif(
    harness.peak_memory_mib(lambda: None) is None, reason="needs /proc/self/clear_refs and VmHWM (Linux)"
)


@_proc_peak
def test_peak_memory_sees_torch_and_non_torch_allocations():
    # The peak is measured from the process's high-water mark, so it must at least cover what was
    # allocated and written, whoever allocated it; a larger allocation has a larger peak.
    mib = 64
    tensor = harness.peak_memory_mib(lambda: torch.ones(mib << 18))  # 64 MiB of float32, written
    raw = harness.peak_memory_mib(lambda: b"x" * (mib << 20))  # plain malloc, invisible to torch
    double = harness.peak_memory_mib(lambda: b"x" * (2 * mib << 20))
    assert tensor >= mib - 1 and raw >= mib - 1
    assert double >= 2 * mib - 1 and double > raw


def test_peak_memory_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        harness.peak_memory_mib(lambda: None, repeats=0)


# ---- the sep_conv suite's definitions ----------------------------------------------------


LAYERS = [
    suite.ConvLayer("odd", 6, 10, 3, 9, 11),
    suite.ConvLayer("k5", 4, 8, 5, 7, 13, kernel=5),
    suite.ConvLayer("grouped", 8, 12, 4, 6, 5, groups=2),
]


def _conv_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# torch's FlopCounterMode over-counts a grouped conv's weight gradient by `groups`, so grouped
# training steps are checked per group instead (next test).
@pytest.mark.parametrize(
    ("layer", "mode"),
    [(layer, mode) for layer in LAYERS for mode in suite.MODES if mode == "forward" or layer.groups == 1],
    ids=lambda v: getattr(v, "name", v),
)
def test_flop_counts_match_torch_flop_counter(layer, mode):
    batch = 2
    fns = suite.make_candidates(layer, batch, mode=mode)
    dense, lowrank = suite.mode_flops(layer, batch, mode)
    assert _conv_flops(fns["dense"]) == dense
    assert _conv_flops(fns["unfused_cl"]) == lowrank
    assert dense / lowrank == pytest.approx(layer.flop_ratio)


def test_grouped_train_flops_are_the_sum_over_groups():
    layer, g, batch = LAYERS[2], LAYERS[2].groups, 2
    one_group = suite.ConvLayer("g", layer.in_channels // g, layer.out_channels // g, layer.rank // g, 6, 5)
    fns = suite.make_candidates(one_group, batch, mode="train")
    dense, lowrank = suite.mode_flops(layer, batch, "train")
    assert g * _conv_flops(fns["dense"]) == dense
    assert g * _conv_flops(fns["unfused"]) == lowrank


def test_vgg16_flop_ratios_follow_from_the_ranks():
    layers = {layer.name: layer for layer in suite.NETS["vgg16"]}
    assert "conv1_1" not in layers and len(layers) == 12
    # 9CN / (3K(C + N)) for 3x3 layers with 'same' padding
    assert layers["conv1_2"].flop_ratio == pytest.approx(9 * 64 * 64 / (3 * 24 * 128))
    assert layers["conv5_3"].flop_ratio == pytest.approx(9 * 512 * 512 / (3 * 320 * 1024))
    x = torch.randn(1, 64, 224, 224)
    with FlopCounterMode(display=False) as counter:
        F.conv2d(x, torch.randn(64, 64, 3, 3), padding=1)
    assert counter.get_total_flops() == layers["conv1_2"].dense_flops(1)


@pytest.mark.parametrize("mode", suite.MODES)
def test_candidates_compute_the_same_thing(mode):
    layer = suite.ConvLayer("odd", 6, 10, 3, 9, 11)
    fns = suite.make_candidates(layer, 2, mode=mode, dtype=torch.float64)
    results = {name: fn() for name, fn in fns.items()}
    for name in ("unfused_cl", "sep", "sep_cl"):
        assert suite.max_rel_error(results[name], results["unfused"]) < 1e-10, name
    if mode == "forward":
        assert results["sep_cl"].is_contiguous(memory_format=torch.channels_last)
        assert results["sep"].is_contiguous()
        assert results["dense"].shape == results["sep"].shape
    else:
        assert len(results["sep"]) == 4 and len(results["dense"]) == 3  # input, weights, bias


def test_max_rel_error_against_independent_reference():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert suite.max_rel_error(a, a) == 0.0
    assert suite.max_rel_error(a + torch.tensor([0.0, 0.0, 0.4]), a) == pytest.approx(0.1)
    assert suite.max_rel_error((a, a * 2), (a, a)) == pytest.approx(1.0)


def test_parse_layers():
    assert [layer.name for layer in suite.parse_layers("conv1_2,conv5_3")] == ["conv1_2", "conv5_3"]
    assert len(suite.parse_layers(None)) == 12
    (custom,) = suite.parse_layers("t:8x16r4@12x10k5")
    assert (custom.in_channels, custom.out_channels, custom.rank, custom.height, custom.width, custom.kernel) == (
        8,
        16,
        4,
        12,
        10,
        5,
    )
    assert suite.parse_layers("t:8x16r4@12")[0].width == 12
    for bad in ("conv9_9", "t:8x16@12", "t:0x16r4@12", "t:8x8r2@2k0", ","):
        with pytest.raises(ValueError, match="--layers"):
            suite.parse_layers(bad)
    with pytest.raises(ValueError, match="--net"):
        suite.parse_layers(None, "resnet")


def _row(name: str, batch: int, mode: str, ms: dict[str, float], ratio: float = 4.0) -> dict:
    timings = {}
    for key, v in ms.items():
        timings[key] = harness.Timing(v, v, v, v, 1)
    return {"name": name, "batch": batch, "mode": mode, "flop_ratio": ratio, "dense_flops": 4, "lowrank_flops": 1,
            "timings": timings}  # fmt: skip


def test_spread_is_the_widest_interquartile_range_of_the_row():
    row = _row("conv1_2", 1, "forward", {f"{c}@2": 10.0 for c in suite.CANDIDATES})
    row["timings"]["sep_cl@2"] = harness.Timing(median_ms=5.0, q1_ms=4.0, q3_ms=6.5, min_ms=4.0, rounds=7)
    row["timings"]["dense@2"] = harness.Timing(median_ms=20.0, q1_ms=19.0, q3_ms=22.0, min_ms=18.0, rounds=7)
    assert suite.derived(row, 2)["spread_pct"] == pytest.approx(50.0)  # sep_cl: 2.5 / 5
    layer = dataclasses.asdict(suite.parse_layers(TINY)[0])
    row |= {"layer": layer, "max_rel_error": {}, "check_tolerance": 1.0, "peak_memory_mib": {}, "output_mib": 1.0}
    table = suite.format_tables([row], 2)
    assert "IQR %" in table and table.splitlines()[-1].split()[-2] == "50"


# ---- the command line ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_minimum_round_time(monkeypatch):
    monkeypatch.setattr(suite, "MIN_ROUND_S", 0.0)  # tiny layers: keep the CLI tests fast


def test_bench_cli_writes_table_json_and_png(tmp_path, capsys):
    json_path = tmp_path / "r.json"
    argv = ["bench", "--layers", TINY, "--batch", "1,2", "--threads", "1,2", "--rounds", "2", "--mode", "both"]
    assert main([*argv, "--json", str(json_path), "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    for header in ("== forward, 2 threads ==", "== train, 1 thread ==", "thread scaling"):
        assert header in out
    assert "sep/unf*" in out and "MiB sep" in out and "WRONG" not in out
    data = json.loads(json_path.read_text())
    assert data["machine"]["cpu"] and data["args"]["batch"] == [1, 2]
    rows = data["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("forward", 1), ("forward", 2), ("train", 1), ("train", 2)]
    for r in rows:
        assert set(r["timings"]) == {f"{c}@{t}" for c in suite.CANDIDATES for t in (1, 2)}
        for t in r["timings"].values():
            assert t["rounds"] == 2 and 0 < t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"]
        assert r["max_rel_error"]["sep"] <= r["check_tolerance"]
        assert set(r["derived"]) == {"1", "2"}
    pngs = list((tmp_path / "o").glob("sep_conv-*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {json_path}" in out
    # --report re-prints the same tables from the JSON, without timing
    assert main(["bench", "--report", str(json_path), "--plot", str(tmp_path / "again.png")]) == 0
    again = capsys.readouterr().out
    assert out.split("== forward, 1 thread ==")[1].split("\nwrote ")[0] in again
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_cli_default_paths_and_forward_only(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "sep_conv", "--layers", TINY, "--batch", "1", "--quick", "--mode", "forward", "--no-memory"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== train" not in out
    (json_file,) = Path("bench/out").glob("sep_conv-*.json")
    data = json.loads(json_file.read_text())
    assert data["rounds"] == 3 and data["rows"][0]["peak_memory_mib"] == {}
    assert len(list(Path("bench/out").glob("sep_conv-*.png"))) == 1


def test_bench_cli_unknown_suite(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "nosuch"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_cli_registered_suite_without_module(monkeypatch):
    monkeypatch.setitem(benchmark.SUITES, "ghost", "lowrank_kernels.benchmark.ghost_suite")
    with pytest.raises(SystemExit, match="suite 'ghost' is not available"):
        main(["bench", "ghost"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "conv9_9"], "--layers"),
        (["--rounds", "0"], "--rounds"),
        (["--report", "/nonexistent/r.json"], "--report"),
    ],
)
def test_bench_cli_bad_suite_options(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["bench", *argv, "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--batch", "1,x"], ["--mode", "sideways"]])
def test_bench_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_python_dash_m_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "lowrank_kernels", "bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--threads" in out and "--layers" in out and "sep_conv" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_cli_cuda(tmp_path, capsys):
    argv = ["bench", "--device", "cuda", "--layers", TINY, "--batch", "1", "--rounds", "2", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "WRONG" not in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_bench_cli_other_dtypes(dtype, tmp_path, capsys):
    argv = ["bench", "--layers", TINY, "--batch", "2", "--rounds", "1", "--dtype", dtype, "--no-memory"]
    assert main([*argv, "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "WRONG" not in out
