"""`lowrank bench model` on tiny configurations: the suite runs, its networks compute the same
thing, and its JSON has the fields a results file needs. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lowrank_kernels.benchmark import model as suite
from lowrank_kernels.cli import main
from lowrank_kernels.layers import SepConv2d


def _tolerance(dtype: torch.dtype, model: nn.Module) -> float:
    """Relative output error expected from rounding alone: per conv/linear layer, storage rounding
    of the dtype plus float32 accumulation over the longest reduction, growing like sqrt(depth)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | SepConv2d)]
    fan_in = max(
        m.weight_v[0].numel() * m.kernel_size[1] if isinstance(m, SepConv2d) else m.weight[0].numel() for m in layers
    )
    per_layer = torch.finfo(dtype).eps + torch.finfo(torch.float32).eps * math.sqrt(fan_in)
    return 4 * math.sqrt(len(layers)) * per_layer


def _run(tmp_path, *argv: str) -> dict:
    json_path = tmp_path / "model.json"
    assert main(["bench", "model", *argv, "--json", str(json_path), "--out-dir", str(tmp_path)]) == 0
    return json.loads(json_path.read_text())


def test_full_rank_models_agree_and_json_has_the_fields(tmp_path, capsys):
    # energy 1.0 keeps every singular value: the compressed network equals the dense one up to rounding.
    data = _run(
        tmp_path,
        *("--models", "resnet18", "--image", "32", "--batch", "1,2", "--dtype", "float32,bfloat16"),
        *("--energy", "1.0", "--quick", "--rounds", "1", "--warmup", "0", "--threads", "1"),
    )
    out = capsys.readouterr().out
    assert "sep_vs_unfused" in out and "ort_sep_ms" in out
    env = data["environment"]
    assert env["cpu"] and env["lowrank_cpu_capability"] in ("default", "avx2", "avx512")
    assert env["torch_cpu_capability"] and "onednn_float32" in env and "isa" in env["onednn_float32"]
    assert data["machine"]["cpu"] and data["suite"] == "model"
    rows = data["rows"]
    assert [(r["dtype"], r["batch"]) for r in rows] == [
        ("float32", 1),
        ("float32", 2),
        ("bfloat16", 1),
        ("bfloat16", 2),
    ]
    dense = suite.build_model("resnet18")
    for r in rows:
        assert r["model"] == "resnet18" and r["threads"] == 1
        expected = {"dense", "unfused", "sep"} | ({"ort_dense", "ort_sep"} if r["dtype"] == "float32" else set())
        assert set(r["timings"]) == expected
        for name in expected:
            assert r[f"{name}_ms"] > 0 and r["timings"][name]["rounds"] == 1
        assert r["sep_vs_unfused"] > 0 and r["sep_vs_dense"] > 0
        tol = _tolerance(getattr(torch, r["dtype"]), dense)
        for name in expected:
            assert r[f"err:{name}"] <= tol, (name, r["dtype"], r[f"err:{name}"], tol)
        assert r["err_c:sep"] <= tol and r["err_c:unfused"] <= tol


def test_vgg16_at_tai_ranks_sep_matches_the_unfused_pair(tmp_path):
    data = _run(
        tmp_path,
        *("--models", "vgg16", "--image", "32", "--batch", "1", "--dtype", "float32", "--no-onnx"),
        *("--quick", "--rounds", "1", "--warmup", "0", "--threads", "1"),
    )
    (row,) = data["rows"]
    assert set(row["timings"]) == {"dense", "unfused", "sep"} and row["ort_sep_ms"] is None
    assert data["ranks"] == "default"
    tol = _tolerance(torch.float32, suite.build_model("vgg16"))
    assert row["err_c:sep"] <= tol and row["err_c:unfused"] == 0.0
    assert row["err:sep"] > tol  # Tai ranks on random weights: the compression error shows


def test_compressed_vgg16_uses_tai_ranks():
    dense = suite.build_model("vgg16")
    ranks = suite.default_ranks("vgg16", dense)
    assert list(ranks.values()) == [layer.rank for layer in suite.NETS["vgg16"]]
    sep = suite.compress_model(dense, ranks)
    layers = [m for m in sep.modules() if isinstance(m, SepConv2d)]
    assert [m.rank for m in layers] == list(ranks.values())
    assert isinstance(sep[0][0], nn.Conv2d)  # conv1_1 (3 input channels) stays dense
    x = torch.randn(1, 3, 32, 32)
    unfused = suite.unfused_model(sep)
    with torch.no_grad():
        torch.testing.assert_close(sep(x), unfused(x), rtol=1e-4, atol=1e-5 * unfused(x).abs().max().item())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "alexnet"], "--models"),
        (["--batch", "0"], "--batch"),
        (["--dtype", "float16"], "--dtype"),
        (["--image", "16"], "--image"),
        (["--energy", "1.5"], "--energy"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "model", *argv, "--json", str(tmp_path / "x.json"), "--out-dir", str(tmp_path)])
