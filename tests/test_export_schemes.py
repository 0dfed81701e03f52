"""to_onnx of the CP, scheme-1 and Tucker-2 layers: standard ONNX ops only, ONNX Runtime within the float32
rounding bound of the float64 dense conv, at batch sizes other than the export's."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_kernels as lk

from tolerances import assert_within, sum_bound

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("tensorly")

torch.manual_seed(0)

CONVS = [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=9, kernel_size=(3, 5), stride=(2, 1), padding=(2, 2), dilation=(2, 1), groups=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect", bias=False),
]
BUILD = {
    "cp": lambda conv: lk.CPConv2d.from_conv(conv, rank=2 * conv.groups),
    "separable_basis_m1": lambda conv: lk.SeparableBasisConv2d.from_conv(conv, rank=1),
    "separable_basis_m3": lambda conv: lk.SeparableBasisConv2d.from_conv(conv, rank=3),
    "tucker2": lambda conv: lk.Tucker2Conv2d.from_conv(conv, rank=(conv.groups * 2, conv.groups * 2)),
}


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _length(layer) -> int:
    """An upper bound on the products summed along any output's chain (all stages), plus the bias."""
    g, (dv, dh) = layer.groups, layer.kernel_size
    ranks = layer.rank if isinstance(layer.rank, tuple) else (layer.rank, layer.rank)
    return layer.in_channels // g + dv * dh * max(ranks) + layer.in_channels * max(ranks) + 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("method", list(BUILD))
def test_scheme_layers_export_to_standard_onnx(tmp_path, cfg, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer = BUILD[method](nn.Conv2d(**cfg)).eval()
    path = tmp_path / "m.onnx"
    lk.to_onnx(layer, (torch.randn(2, cfg["in_channels"], 11, 12),), path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), {n.domain for n in model.graph.node}
    assert "Conv" in [n.op_type for n in model.graph.node]
    absolute = copy.deepcopy(layer).double()
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
    for batch in (1, 3):
        x = torch.randn(batch, cfg["in_channels"], 11, 12)
        with torch.no_grad():
            want = copy.deepcopy(layer).double()(x.double())
            mag = absolute(x.double().abs())
        assert_within(_run_onnx(path, x), want, sum_bound(mag, _length(layer), torch.float32), f"{method} onnx")


def test_compressed_model_every_method_exports(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 64, 4)
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    for method in ("tai", "separable_basis", "cp", "tucker2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            compressed, report = lk.compress(model, rank=4, example_input=x, method=method, progress=False)
        assert any(r.method == method for r in report.layers)
        path = tmp_path / f"{method}.onnx"
        lk.to_onnx(compressed, (x,), path)
        ref = copy.deepcopy(compressed).double()
        absolute = copy.deepcopy(ref)
        with torch.no_grad():
            for p in absolute.parameters():
                p.abs_()
            want, mag = ref(x.double()), absolute(x.double().abs())
        # ReLU is 1-Lipschitz and keeps non-negative values, so the chain's bound carries through it; every
        # stage's sum is no longer than its fan-in, and the fan-ins add up to at most the parameter count.
        length = sum(p.numel() for p in compressed.parameters())
        assert_within(_run_onnx(path, x), want, sum_bound(mag, length, torch.float32), f"{method} model")
