"""Triton implementations (DESIGN section 3): callable on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 is set before triton is imported.

This module is imported by `import lowrank_kernels` and must work without triton and without CUDA,
so each entry point loads its kernel module (lowrank_kernels/triton/<op>.py) on first call, through
`_kernels`."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .._conv_args import IntOrPair, _pair

__all__ = ["sep_conv", "batched_svd"]


def _kernels(name: str) -> ModuleType:
    """Import the kernel module `lowrank_kernels.triton.<name>` (this needs triton).

    Importing a submodule binds it as an attribute of this package, which would shadow the public
    function of the same name; the function is put back. Import kernel modules only through here."""
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = _ENTRY_POINTS[name]
    return module


def sep_conv(
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """lowrank_kernels.sep_conv computed by the fused Triton kernels (differentiable).

    Same arguments and result as `lowrank_kernels.sep_conv`. CUDA tensors go through the op
    (torch.ops.lowrank.sep_conv, whose CUDA kernels are these Triton kernels), so torch.compile sees
    the same opaque op. CPU tensors run the kernels in the Triton interpreter (TRITON_INTERPRET=1 set
    before triton is imported), otherwise RuntimeError; ImportError if triton is not installed.
    """
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"sep_conv: groups must be an int, got {groups!r}")
    if isinstance(input, torch.Tensor) and input.is_cuda:
        from ..sep_conv import sep_conv as op

        return op(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
    return _kernels("sep_conv").sep_conv(
        input,
        weight_v,
        weight_h,
        bias,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
        groups,
    )


def batched_svd(
    A: torch.Tensor, rank: int | None = None, *, max_sweeps: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lowrank_kernels.batched_svd computed by the Triton Jacobi kernel (not differentiable by itself).

    Same arguments and result as `lowrank_kernels.batched_svd`. CUDA tensors (or CPU tensors with
    TRITON_INTERPRET=1 set before triton is imported); ImportError if triton is not installed. For
    autograd on CUDA use `lowrank_kernels.batched_svd`, which dispatches here."""
    return _kernels("batched_svd").batched_svd(A, rank, max_sweeps=max_sweeps)


_ENTRY_POINTS = {"sep_conv": sep_conv, "batched_svd": batched_svd}
