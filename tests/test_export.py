"""to_onnx: sep_conv becomes two standard Conv nodes; ONNX Runtime matches PyTorch at any batch size."""

import numpy as np
import pytest
import torch
from torch import nn

import lowrank_kernels as lk

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

torch.manual_seed(0)


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_compressed_model_runs_in_onnxruntime(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, (3, 5), stride=(2, 1), padding=(2, 2), dilation=(2, 1), groups=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(96, 10),
    )
    compressed, report = lk.compress(model, rank=4, example_input=torch.randn(1, 3, 12, 14), progress=False)
    n_sep = sum(isinstance(m, lk.SepConv2d) for m in compressed.modules())
    assert isinstance(compressed[2], lk.SepConv2d) and isinstance(compressed[4], lk.SepConv2d)
    path = tmp_path / "m.onnx"
    lk.to_onnx(compressed, (torch.randn(2, 3, 12, 14),), path)
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(onnx.load(str(path)))
    ops = [n.op_type for n in graph.node]
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), {n.domain for n in graph.node}
    dense_convs = sum(type(m) is nn.Conv2d for m in compressed.modules())
    assert ops.count("Conv") == dense_convs + 2 * n_sep
    compressed.eval()
    for batch in (1, 5):  # dynamic batch: neither equals the export batch
        x = torch.randn(batch, 3, 12, 14)
        with torch.no_grad():
            want = compressed(x).numpy()
        np.testing.assert_allclose(run_onnx(path, x), want, rtol=1e-4, atol=1e-5)


def test_static_batch_and_kwargs(tmp_path):
    layer = lk.SepConv2d(4, 6, (3, 1), rank=2, padding=(1, 0))
    path = tmp_path / "s.onnx"
    program = lk.to_onnx(layer, torch.randn(3, 4, 7, 7), path, dynamic_batch=False, input_names=["images"])
    assert program is not None
    model = onnx.load(str(path))
    assert model.graph.input[0].name == "images"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    x = torch.randn(3, 4, 7, 7)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, x), layer(x).numpy(), rtol=1e-4, atol=1e-5)
    assert layer.training  # restored after export
