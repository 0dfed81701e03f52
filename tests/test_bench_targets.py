"""bench/targets.py: the project's pass/fail goals, evaluated on benchmark runs' JSON (the package
itself reports ratios only). Synthetic rows with known ratios, and one tiny real run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lowrank_kernels.benchmark import harness
from lowrank_kernels.benchmark import sep_conv as suite
from lowrank_kernels.cli import main as cli_main

_PATH = Path(__file__).resolve().parents[1] / "bench" / "targets.py"
_spec = importlib.util.spec_from_file_location("bench_targets", _PATH)
targets = importlib.util.module_from_spec(_spec)
sys.modules["bench_targets"] = targets  # dataclasses look their module up there
_spec.loader.exec_module(targets)


def _row(name: str, batch: int, mode: str, ms: dict[str, float], ratio: float = 4.0) -> dict:
    timings = {key: harness.Timing(v, v, v, v, 1) for key, v in ms.items()}
    return {
        "name": name,
        "batch": batch,
        "mode": mode,
        "flop_ratio": ratio,
        "dense_flops": 4,
        "lowrank_flops": 1,
        "timings": timings,
    }


def test_targets_pass_and_fail_on_synthetic_rows():
    def ms(dense, unfused, sep, sep_cl, threads=2):
        values = {"dense": dense, "dense_cl": dense * 2, "unfused": unfused, "unfused_cl": unfused * 3}
        values |= {"sep": sep, "sep_cl": sep_cl}
        return {f"{k}@{threads}": v for k, v in values.items()}

    rows = [
        # conv1_2 b1: sep 2x faster than unfused; efficiency (8/2)/4 = 1.0; sep_cl only 1.25x -> fails 1.5
        _row("conv1_2", 1, "forward", ms(8.0, 4.0, 2.0, 3.2) | ms(16.0, 8.0, 4.0, 4.0, threads=1)),
        _row("conv1_2", 8, "forward", ms(8.0, 4.0, 2.0, 2.0) | ms(16.0, 8.0, 3.0, 4.0, threads=1)),
        _row("conv1_2", 8, "train", ms(8.0, 4.0, 5.0, 2.0) | ms(16.0, 8.0, 10.0, 4.0, threads=1)),
    ]
    results = {(r["mode"], r["target"], r["format"]): r for r in targets.evaluate_sep_conv(rows, [1, 2])}
    fwd_every = results[("forward", targets.SEP_CONV_TARGETS[0].text, "NCHW")]
    assert fwd_every["result"] == "PASS" and fwd_every["min"] == pytest.approx(2.0)
    conv12_cl = results[("forward", targets.SEP_CONV_TARGETS[1].text, "channels_last")]
    assert conv12_cl["result"] == "FAIL" and conv12_cl["failing"] == "conv1_2/b1 1.25"
    assert results[("forward", targets.SEP_CONV_TARGETS[3].text, "NCHW")]["median"] == pytest.approx(1.0)
    train = results[("train", targets.SEP_CONV_TARGETS[4].text, "NCHW")]
    assert train["result"] == "FAIL" and train["min"] == pytest.approx(0.8)
    scaling = results[("forward", "2 threads / 1 thread at batch 8", "NCHW")]
    assert scaling["rows"] == 1 and scaling["min"] == pytest.approx(1.5) and scaling["result"] == "FAIL"
    # conv2_x targets do not apply to these rows; without 1 thread there is no scaling target
    assert not any("conv2_1" in key[1] for key in results)
    assert not any(r["target"].startswith("2 threads") for r in targets.evaluate_sep_conv(rows, [2]))


def _svd_row(shape: str, x: float, err: float, dtype: str = "float32", threads: int = 2) -> dict:
    errs = {"rec_err:batched_svd": err, "orth_u:batched_svd": err / 2, "orth_v:batched_svd": 0.0}
    return {"shape": shape, "dtype": dtype, "threads": threads, "x_vs_svd": x, **errs}


def test_svd_goals():
    rows = [
        _svd_row("10000x8x8", 12.0, 1e-6),  # fast enough, accurate
        _svd_row("1024x64x64", 4.0, 1e-6),  # needs 5x
        _svd_row("10000x16x16", 20.0, 1e-4),  # not accurate enough for float32
        _svd_row("10000x8x8", 1.0, 1e-6, threads=1),  # speed goals are set at 2 threads
        _svd_row("7x3x3", 0.5, 1e-13, dtype="float64"),  # no speed goal for this shape
    ]
    verdicts = targets.evaluate_svd(rows)
    assert [v["result"] for v in verdicts] == ["PASS", "FAIL", "FAIL", "PASS", "PASS"]
    assert verdicts[1]["speed"].startswith("FAIL (4.0x, need 5x")
    assert verdicts[2]["accuracy"].startswith("FAIL") and verdicts[2]["speed"].startswith("ok")
    assert verdicts[3]["speed"] == "-" and verdicts[4]["speed"] == "-"


def test_script_on_a_real_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "MIN_ROUND_S", 0.0)
    run = tmp_path / "run.json"
    argv = ["bench", "--layers", "conv1_2:6x10r3@9x11", "--batch", "8", "--threads", "1,2", "--rounds", "1"]
    assert cli_main([*argv, "--no-memory", "--json", str(run), "--out-dir", str(tmp_path)]) == 0
    assert "goals" not in capsys.readouterr().out  # the suite itself judges nothing
    status = targets.main([str(run)])
    out = capsys.readouterr().out
    text, verdicts = targets.check_file(run)
    assert status == (1 if any(v["result"] == "FAIL" for v in verdicts) else 0)
    assert "sep_conv goals" in out and "2 threads / 1 thread at batch 8" in out
    assert {v["target"] for v in verdicts} >= {t.text for t in targets.SEP_CONV_TARGETS if t.text.endswith("conv1_2")}


def test_script_rejects_other_files(tmp_path):
    other = tmp_path / "h.json"
    other.write_text(json.dumps({"suite": "householder"}))
    with pytest.raises(SystemExit, match="no goals for suite 'householder'"):
        targets.main([str(other)])
    with pytest.raises(SystemExit, match="missing.json"):
        targets.main([str(tmp_path / "missing.json")])
