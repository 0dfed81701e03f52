"""The results data file (lowrank_kernels/benchmark/results.py): `lowrank bench --record` upserts
medians and quartiles keyed by suite, case, candidate, dtype, device, threads, batch and machine;
`lowrank bench --report` renders headline tables and plots from it. Tiny cases; no timing asserted."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_kernels  # noqa: F401  (registers the ops)
from lowrank_kernels.benchmark import harness, results
from lowrank_kernels.benchmark import sep_conv as suite
from lowrank_kernels.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = "tiny:6x10r3@9x11"


def _timing(ms: float, spread: float = 0.0) -> harness.Timing:
    return harness.Timing(ms, ms - spread, ms + spread, ms - spread, 5)


def _record(case: str, candidate: str, ms: float, **over) -> dict:
    row = {
        "suite": "sep_conv",
        "case": case,
        "candidate": candidate,
        "dtype": "float32",
        "device": "cpu",
        "threads": 2,
        "batch": 1,
        "cpu": "Test CPU",
        "isa": "AVX2",
        "gpu": "",
        "median_ms": ms,
        "q1_ms": ms,
        "q3_ms": ms,
        "rounds": 5,
        "flops": "",
        "torch": "2.x",
        "commit": "abc",
        "date": "2026-01-01 00:00",
    }
    return row | over


def test_upsert_adds_replaces_and_keeps_one_row_per_key(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert results.upsert(path, [_record("forward/a", "sep", 2.0), _record("forward/a", "dense", 4.0)]) == (2, 0)
    again = [_record("forward/a", "sep", 1.5, date="2026-01-02 00:00"), _record("forward/a", "sep", 3.0, threads=1)]
    assert results.upsert(path, again) == (1, 1)
    rows = results.load(path)
    assert len(rows) == 3
    by_key = {(r["candidate"], r["threads"]): r for r in rows}
    assert float(by_key[("sep", "2")]["median_ms"]) == 1.5 and by_key[("sep", "2")]["date"] == "2026-01-02 00:00"
    assert float(by_key[("dense", "2")]["median_ms"]) == 4.0
    # another machine is another key
    assert results.upsert(path, [_record("forward/a", "sep", 9.0, cpu="Other CPU")]) == (1, 0)
    with path.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == results.COLUMNS


def test_upsert_output_is_sorted_and_stable(tmp_path):
    path = tmp_path / "r.csv"
    recs = [_record("forward/b", "sep", 1.0, batch=b) for b in (8, 1, 16)] + [_record("forward/a", "sep", 1.0)]
    results.upsert(path, recs)
    first = path.read_text()
    results.upsert(path, reversed(recs))
    assert path.read_text() == first
    rows = results.load(path)
    assert [(r["case"], r["batch"]) for r in rows] == [
        ("forward/a", "1"),
        ("forward/b", "1"),
        ("forward/b", "8"),
        ("forward/b", "16"),
    ]


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results file"):
        results.load(bad)


def test_make_records_carries_machine_and_provenance():
    recs = results.make_records(
        "svd",
        [{"case": "8x8", "candidate": "svd", "threads": 2, "batch": 100, "timing": _timing(3.0, 0.5)}],
        dtype="float32",
    )
    (r,) = recs
    assert r["isa"] == torch.backends.cpu.get_cpu_capability() and r["cpu"] == harness.machine_info()["cpu"]
    assert r["gpu"] == "" and r["torch"] == torch.__version__ and r["date"]
    assert (r["median_ms"], r["q1_ms"], r["q3_ms"], r["rounds"]) == (3.0, 2.5, 3.5, 5)
    assert set(results.COLUMNS) <= set(r)


def test_headline_rows_ratios_flop_ratio_and_spread():
    rows = [
        _record("forward/a", "dense", 8.0, flops=400),
        _record("forward/a", "dense_cl", 6.0, flops=400),
        _record("forward/a", "unfused", 4.0, flops=100),
        _record("forward/a", "unfused_cl", 5.0, flops=100),
        _record("forward/a", "sep", 3.0, flops=100, q1_ms=2.7, q3_ms=3.6),
        _record("forward/a", "sep_cl", 2.0, flops=100),
    ]
    as_read = [{k: results._cell(v) for k, v in r.items()} for r in rows]
    (row,) = results.headline_rows(as_read, suite.REPORTS["sep_conv"])
    assert row["FLOP ratio"] == pytest.approx(4.0)
    assert row["sep x"] == pytest.approx(6.0 / 3.0) and row["sep_cl x"] == pytest.approx(6.0 / 2.0)
    assert row["sep/unf*"] == pytest.approx(4.0 / 3.0) and row["sep_cl/unf*"] == pytest.approx(2.0)
    assert row["IQR %"] == pytest.approx(30.0)
    # a missing candidate leaves its cells empty instead of failing
    (partial,) = results.headline_rows(as_read[:2], suite.REPORTS["sep_conv"])
    assert partial["sep x"] is None and partial["sep ms"] is None


def test_format_table_markdown():
    text = harness.format_table([{"a": 1.234, "b": None}], ["a", "b"], markdown=True)
    assert text.splitlines() == ["| a | b |", "|---:|---:|", "| 1.23 | - |"]


def test_report_groups_by_machine_and_thread_count(tmp_path):
    path = tmp_path / "r.csv"
    recs = [_record("forward/a", c, 1.0 + i) for i, c in enumerate(suite.CANDIDATES)]
    recs += [_record("forward/a", c, 2.0, threads=1) for c in suite.CANDIDATES]
    recs += [_record("forward/a", c, 2.0, cpu="Other CPU", isa="AVX512") for c in suite.CANDIDATES]
    results.upsert(path, recs)
    text = results.report(path, suite.REPORTS, markdown=True, plot_dir=tmp_path / "plots")
    titles = [line for line in text.splitlines() if line.startswith("### ")]
    assert titles == [
        "### sep_conv: Other CPU, AVX512, cpu, float32, 2 threads",
        "### sep_conv: Test CPU, AVX2, cpu, float32, 1 thread",
        "### sep_conv: Test CPU, AVX2, cpu, float32, 2 threads",
    ]
    assert "| forward/a | 1 |" in text and "commit abc" in text
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert "no rows" in results.report(path, suite.REPORTS, suites=["svd"])


@pytest.fixture
def _fast(monkeypatch):
    monkeypatch.setattr(suite, "MIN_ROUND_S", 0.0)


def test_cli_record_then_report(tmp_path, capsys, _fast):
    data = tmp_path / "results.csv"
    argv = ["bench", "--layers", TINY, "--batch", "1,2", "--threads", "1", "--rounds", "2", "--no-memory"]
    assert main([*argv, "--out-dir", str(tmp_path / "o"), "--record", str(data)]) == 0
    assert f"recorded 24 rows in {data} (24 new, 0 replaced)" in capsys.readouterr().out
    rows = results.load(data)
    assert {r["case"] for r in rows} == {"forward/tiny", "train/tiny"}
    assert {r["candidate"] for r in rows} == set(suite.CANDIDATES)
    assert {r["batch"] for r in rows} == {"1", "2"} and {r["threads"] for r in rows} == {"1"}
    layer = suite.parse_layers(TINY)[0]
    sep_fwd_b2 = next(r for r in rows if r["case"] == "forward/tiny" and r["batch"] == "2" and r["candidate"] == "sep")
    assert int(sep_fwd_b2["flops"]) == suite.mode_flops(layer, 2, "forward")[1]
    assert all(float(r["q1_ms"]) <= float(r["median_ms"]) <= float(r["q3_ms"]) for r in rows)
    # a second run of the same configuration replaces its rows
    assert main([*argv, "--mode", "forward", "--out-dir", str(tmp_path / "o"), "--record", str(data)]) == 0
    assert "(0 new, 12 replaced)" in capsys.readouterr().out
    assert len(results.load(data)) == 24

    assert main(["bench", "--report", str(data), "--markdown", "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "### sep_conv:" in out and "| train/tiny | 2 |" in out and "sep/unf*" in out
    assert list((tmp_path / "o" / "report").glob("sep_conv-*.png"))
    assert main(["bench", "svd", "--report", str(data), "--out-dir", str(tmp_path / "o")]) == 0
    assert "no rows for suite(s) svd" in capsys.readouterr().out


def test_cli_record_default_path(tmp_path, capsys, monkeypatch, _fast):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--layers", TINY, "--batch", "1", "--threads", "1", "--rounds", "1", "--mode", "forward"]
    assert main([*argv, "--no-memory", "--record"]) == 0
    assert len(results.load(Path("bench/results.csv"))) == len(suite.CANDIDATES)


def test_cli_svd_suite_records(tmp_path, capsys):
    data = tmp_path / "r.csv"
    argv = ["bench", "svd", "--shapes", "6x4x4,3x5x3", "--rounds", "1", "--threads", "1", "--record", str(data)]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    rows = results.load(data)
    assert {(r["case"], r["batch"]) for r in rows} == {("4x4", "6"), ("5x3", "3")}
    assert main(["bench", "svd", "--report", str(data), "--out-dir", str(tmp_path)]) == 0
    assert "x svd" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--report", "/nonexistent/results.csv"], "--report"),
        (["svd", "--report", "/nonexistent/run.json"], "sep_conv only"),
    ],
)
def test_cli_report_bad_paths(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["bench", *argv, "--out-dir", str(tmp_path)])


def test_committed_results_file_is_well_formed():
    """bench/results.csv (the project's recorded results) loads, and every row has one key."""
    path = Path(__file__).resolve().parents[1] / "bench" / "results.csv"
    if not path.exists():
        pytest.skip("no bench/results.csv in this tree")
    rows = results.load(path)
    keys = [tuple(r[k] for k in results.KEY) for r in rows]
    assert len(keys) == len(set(keys))
    assert all(float(r["q1_ms"]) <= float(r["median_ms"]) <= float(r["q3_ms"]) for r in rows)


def test_results_page_is_generated_from_the_data_file():
    """bench/RESULTS.md's generated tables are what `lowrank bench <suite> --report --markdown` gives on
    bench/results.csv (after recording, run `python bench/update_results_md.py`)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "update_results_md.py"
    page = script.with_name("RESULTS.md")
    if not page.exists():
        pytest.skip("no bench/RESULTS.md in this tree")
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
