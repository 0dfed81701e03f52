"""ONNX export of models that use `sep_conv`: each call becomes two standard ONNX `Conv` nodes
(the vertical factor, then the horizontal one, exactly `_reference.sep_conv_reference`), so any
ONNX runtime can run a compressed model without a custom operator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["to_onnx"]


def _sep_conv_onnx(input, weight_v, weight_h, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    # Traced by the exporter with onnxscript tensors; ONNX pads are (top, left, bottom, right).
    from onnxscript import opset18 as op

    t = op.Conv(
        input,
        weight_v,
        strides=[stride[0], 1],
        pads=[padding[0], 0, padding[0], 0],
        dilations=[dilation[0], 1],
        group=groups,
    )
    h_args = (t, weight_h) if bias is None else (t, weight_h, bias)
    return op.Conv(
        *h_args,
        strides=[1, stride[1]],
        pads=[0, padding[1], 0, padding[1]],
        dilations=[1, dilation[1]],
        group=groups,
    )


def to_onnx(
    model: torch.nn.Module,
    args: tuple | torch.Tensor,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    opset_version: int = 18,
    **kwargs: Any,
) -> torch.onnx.ONNXProgram:
    """Export `model` (called as `model(*args)`) to an ONNX file at `path`.

    Uses `torch.onnx.export(..., dynamo=True)` with a translation of `lowrank::sep_conv` into two
    `Conv` nodes. With `dynamic_batch`, dimension 0 of every tensor argument is exported as a
    symbolic batch size (unless `dynamic_shapes` is passed in `kwargs`). Other keyword
    arguments go to `torch.onnx.export`. Returns the ONNXProgram.
    """
    args = args if isinstance(args, tuple) else (args,)
    table = dict(kwargs.pop("custom_translation_table", None) or {})
    table.setdefault(torch.ops.lowrank.sep_conv.default, _sep_conv_onnx)
    if dynamic_batch and "dynamic_shapes" not in kwargs:
        batch = torch.export.Dim.DYNAMIC
        kwargs["dynamic_shapes"] = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            opset_version=opset_version,
            custom_translation_table=table,
            **kwargs,
        )
    finally:
        model.train(was_training)
    return program
