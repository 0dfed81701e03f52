"""Deployment without Python: AOTInductor packages of models that call the `lowrank` ops.

`export_aoti` turns a model into a `.pt2` package (torch.export, then
torch._inductor.aoti_compile_and_package). The compiled graph calls `lowrank::sep_conv` (and the
other ops) through the dispatcher, so whatever runs the package must have the op library loaded:
`load_aoti` here (importing lowrank_kernels loads it), or a C++ program that links
`liblowrank_ops.so` (see examples/cpp/ and docs/deployment.md).

The package records, as metadata, the input shapes and dtypes it was compiled for and the lowrank
ops it calls, so that a loader can check both before running (examples/cpp/main.cpp does).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_aoti", "load_aoti", "AOTIModel"]

# Metadata keys written into the package (read back by load_aoti and examples/cpp/main.cpp).
_META_NUM_INPUTS = "lowrank.num_inputs"
_META_OPS = "lowrank.ops"


def _meta_shape(i: int) -> str:
    return f"lowrank.input{i}.shape"


def _meta_dtype(i: int) -> str:
    return f"lowrank.input{i}.dtype"


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError("example_inputs: expected a tensor or a non-empty tuple of tensors")
    return tuple(inputs)


def _lowrank_ops(program: torch.export.ExportedProgram) -> list[str]:
    ops = set()
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace == "lowrank":
            ops.add(f"lowrank::{target._opname}")
    return sorted(ops)


def export_aoti(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    inductor_configs: dict[str, Any] | None = None,
) -> str:
    """Compile `model` (called as `model(*example_inputs)`, in eval mode) into an AOTInductor package.

    `path` must end in `.pt2`. With `dynamic_batch`, dimension 0 of every input is a symbolic
    batch size (the example's batch must then be at least 2: torch.export specializes a batch of
    1); every other dimension, the dtype and the device are fixed to the example's. The package
    takes contiguous inputs. Returns the package path.

    Run it with `load_aoti(path)` in Python, or from C++ with
    `torch::inductor::AOTIModelPackageLoader` in a program that links the op library (see
    examples/cpp/). The lowrank ops run their C++ kernels there, so a C++-only deployment is a CPU
    one: the CUDA kernels of the ops are Triton, which needs Python.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"path: an AOTInductor package must be named *.pt2, got {str(path)!r}")
    inputs = tuple(t.contiguous() for t in _as_inputs(example_inputs))
    if dynamic_batch:
        small = [i for i, t in enumerate(inputs) if t.dim() == 0 or t.shape[0] < 2]
        if small:
            raise ValueError(
                f"example_inputs: input {small[0]} needs a batch dimension of size >= 2 with dynamic_batch=True "
                "(torch.export fixes a batch of 1); pass dynamic_batch=False for a fixed batch"
            )
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes: tuple | None = tuple({0: batch} for _ in inputs)
    else:
        dynamic_shapes = None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)

    metadata = {_META_NUM_INPUTS: str(len(inputs)), _META_OPS: ",".join(_lowrank_ops(program))}
    for i, t in enumerate(inputs):
        dims = [-1 if (dynamic_batch and d == 0) else s for d, s in enumerate(t.shape)]
        metadata[_meta_shape(i)] = ",".join(map(str, dims))
        metadata[_meta_dtype(i)] = str(t.dtype).removeprefix("torch.")
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), **metadata}

    path.parent.mkdir(parents=True, exist_ok=True)
    return str(torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs))


def _check_package_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"path: {str(path)!r} does not exist (make one with lowrank_kernels.export_aoti)")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"path: {str(path)!r} is not an AOTInductor package (a .pt2 zip archive written by "
            "lowrank_kernels.export_aoti or torch._inductor.aoti_compile_and_package)"
        )


class AOTIModel:
    """A loaded AOTInductor package: call it with the inputs; they are checked against the shapes and
    dtypes the package was compiled for (when it was made by `export_aoti`) before it runs."""

    def __init__(self, path: str | Path):
        path = Path(path)
        _check_package_file(path)
        try:
            self._model = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # torch raises RuntimeError with the loader's message
            raise ValueError(f"path: {str(path)!r} could not be loaded as an AOTInductor package: {e}") from e
        self.metadata: dict[str, str] = dict(self._model.get_metadata())
        self.path = str(path)

    def _expected(self) -> list[tuple[list[int], str]] | None:
        if _META_NUM_INPUTS not in self.metadata:
            return None  # not made by export_aoti: AOTInductor's own checks apply
        n = int(self.metadata[_META_NUM_INPUTS])
        return [
            ([int(s) for s in self.metadata[_meta_shape(i)].split(",") if s], self.metadata[_meta_dtype(i)])
            for i in range(n)
        ]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        expected = self._expected()
        if expected is not None:
            if len(inputs) != len(expected):
                raise ValueError(f"inputs: the package takes {len(expected)} input(s), got {len(inputs)}")
            for i, (t, (shape, dtype)) in enumerate(zip(inputs, expected)):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"inputs[{i}]: expected a tensor, got {type(t).__name__}")
                ok = t.dim() == len(shape) and all(e in (-1, s) for e, s in zip(shape, t.shape))
                if not ok or str(t.dtype).removeprefix("torch.") != dtype:
                    want = "[" + ", ".join("batch" if e == -1 else str(e) for e in shape) + "]"
                    raise ValueError(
                        f"inputs[{i}]: the package was compiled for {dtype} {want}, got {str(t.dtype)[6:]} "
                        f"{list(t.shape)}"
                    )
            if any(t.shape[0] == 0 for t, (shape, _) in zip(inputs, expected) if shape and shape[0] == -1):
                raise ValueError("inputs: batch size 0 is not supported by the package")
        return self._model(*(t.contiguous() for t in inputs))


def load_aoti(path: str | Path) -> AOTIModel:
    """Load a `.pt2` package made by `export_aoti` (the op library is loaded with lowrank_kernels)."""
    return AOTIModel(path)
