"""`lowrank bench model` on tiny configurations: the suite runs, its networks compute the same
thing, and its JSON has the fields a results file needs. No timing assertions."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from lowrank_kernels import CPConv2d, SeparableBasisConv2d, Tucker2Conv2d
from lowrank_kernels.benchmark import model as suite
from lowrank_kernels.benchmark import results
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


# ---- --method: the other decompositions on a small network (the suite's machinery, tiny sizes). ----


def _tiny(name: str = "resnet18", seed: int = 0) -> nn.Module:
    """A stand-in for the suite's networks: two 3 x 3 convs the methods compress, pooling, a linear head."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def _dense_twin(model: nn.Module) -> nn.Module:
    """`model` with every compressed layer replaced by an nn.Conv2d holding its dense_weight()."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if hasattr(m, "dense_weight"):
            conv = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                m.bias is not None,
            )
            with torch.no_grad():
                conv.weight.copy_(m.dense_weight())
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, conv)
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # CP-ALS convergence on random weights
@pytest.mark.parametrize("method", suite.METHODS)
def test_compress_method_fused_and_plain_chains_compute_the_dense_twin(method):
    pytest.importorskip("tensorly")
    dense = _tiny()
    ranks = suite.default_ranks("resnet18", dense)
    compressed = suite.compress_method(dense, method, ranks, None, 32)
    replaced = [m for m in compressed.modules() if hasattr(m, "dense_weight")]
    assert len(replaced) == len(ranks)
    kinds = {"tai": SepConv2d, "separable_basis": SeparableBasisConv2d, "cp": CPConv2d, "tucker2": Tucker2Conv2d}
    assert all(isinstance(m, kinds[method]) for m in replaced)
    # At most the tai layers' MACs (the suite compares the methods at about equal cost).
    tai_cost = suite.model_cost(suite.compress_model(dense, ranks), 32)
    assert suite.model_cost(compressed, 32)["macs"] <= tai_cost["macs"] < suite.model_cost(dense, 32)["macs"]
    # Untouched parameters are shared, not copied.
    assert compressed[-1].weight is dense[-1].weight
    x = torch.randn(2, 3, 32, 32)
    twin = _dense_twin(compressed)
    with torch.no_grad():
        ref = twin(x)
        for model in (compressed, suite.unfused_model(compressed)):
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_method_rows_and_records(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorly")
    monkeypatch.setattr(suite, "build_model", _tiny)
    record = tmp_path / "results.csv"
    methods = ",".join(suite.METHODS)
    data = _run(
        tmp_path,
        *("--models", "resnet18", "--image", "32", "--batch", "2", "--dtype", "float32,bfloat16"),
        *("--method", methods, "--rounds", "1", "--warmup", "0", "--threads", "1", "--record", str(record)),
    )
    out = capsys.readouterr().out
    assert "lowrank_vs_dense" in out and "MACs_vs_dense" in out
    assert data["methods"] == list(suite.METHODS)
    rows = data["rows"]
    assert [(r["dtype"], r["method"]) for r in rows] == [(d, m) for d in ("float32", "bfloat16") for m in suite.METHODS]
    tol32 = _tolerance(torch.float32, _tiny())
    for r in rows:
        fused = r["method"] != "tucker2"
        expected = {"dense", "unfused"} | ({"sep"} if fused else set())
        if r["dtype"] == "float32":
            expected |= {"ort_dense", "ort_sep"}
        assert set(r["timings"]) == expected, r["method"]
        assert r["lowrank_ms"] > 0 and r["lowrank_vs_dense"] > 0 and r["unfused_vs_dense"] > 0
        assert (r["sep_vs_unfused"] is not None) == fused and (r["sep_ms"] is not None) == fused
        assert 0 < r["macs"] < r["dense_macs"] and r["params"] < r["dense_params"]
        assert r["compress_s"] >= 0 and r["err:lowrank"] > 0
        # The float32 plain chain is its own reference; sep_conv and ORT agree with it to rounding.
        if r["dtype"] == "float32":
            assert r["err_c:unfused"] == 0.0 and r["err_c:ort_sep"] <= tol32
            if fused:
                assert r["err_c:sep"] <= tol32
    recorded = results.load(record)
    cases = {(r["case"], r["candidate"], r["dtype"]) for r in recorded}
    assert ("resnet18@32", "sep", "float32") in cases  # tai keeps the suite's original case names
    assert ("resnet18@32/cp", "sep", "bfloat16") in cases and ("resnet18@32/cp", "unfused", "float32") in cases
    assert ("resnet18@32/tucker2", "unfused", "float32") in cases
    assert ("resnet18@32/tucker2", "sep", "float32") not in cases
    assert ("resnet18@32/separable_basis", "ort_sep", "float32") in cases
    assert len(recorded) == sum(len(r["timings"]) for r in rows)
    report = results.report(record, suite.REPORTS)
    assert "resnet18@32/tucker2" in report and "unfused vs dense" in report


@pytest.mark.parametrize("value", ["svd", "tai,auto", ","])
def test_bad_method_is_a_clear_error(tmp_path, value):
    with pytest.raises(SystemExit, match="--method must name some of tai, separable_basis, cp, tucker2"):
        main(["bench", "model", "--method", value, "--json", str(tmp_path / "x.json"), "--out-dir", str(tmp_path)])
