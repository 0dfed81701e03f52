"""The one place that turns conv-style arguments (int or pair) into the op's int[2] lists
and checks them the way the C++ kernel does (used by the fake kernel and the Triton path)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

IntOrPair = int | Sequence[int]


def _as_int(value: object) -> int | None:
    """`value` as a Python int when it is an integer the way nn.Conv2d's sizes may be (int, numpy
    integer, anything with __index__), else None; bools and tensors are not sizes."""
    if isinstance(value, bool | torch.Tensor):
        return None
    if isinstance(value, int):
        return value
    # No exception on the common path: torch.compile traces this function, and some torch
    # versions' Dynamo cannot trace a TypeError raised and caught here.
    return operator.index(value) if hasattr(type(value), "__index__") else None


def _pair(value: IntOrPair, name: str) -> list[int]:
    single = _as_int(value)
    if single is not None:
        return [single, single]
    try:
        items = [_as_int(v) for v in value]
    except TypeError:
        raise ValueError(f"sep_conv: {name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or None in items:
        raise ValueError(f"sep_conv: {name} must be an int or a pair of ints, got {value!r}")
    return items


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_sep_conv(
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[int, int, int, int]:
    """Validate sep_conv arguments (contract in docs/design.md); return the output shape (B, N, H', W')."""

    def fail(msg: str) -> None:
        raise ValueError(f"sep_conv: {msg}")

    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:
            fail(f"{name} must have 2 elements, got {len(v)}")
    if input.dim() != 4:
        fail(f"input must be 4-D (B, C, H, W), got {input.dim()}-D")
    if weight_v.dim() != 4 or weight_v.shape[3] != 1:
        fail(f"weight_v must have shape (K, C/groups, dv, 1), got {tuple(weight_v.shape)}")
    if weight_h.dim() != 4 or weight_h.shape[2] != 1:
        fail(f"weight_h must have shape (N, K/groups, 1, dh), got {tuple(weight_h.shape)}")
    if not input.dtype.is_floating_point:
        fail(f"input must be a floating-point tensor, got {input.dtype}")
    tensors = [("weight_v", weight_v), ("weight_h", weight_h)]
    if bias is not None:
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.dtype != input.dtype:
            fail(f"{name} dtype {t.dtype} does not match input dtype {input.dtype}")
        if t.device != input.device:
            fail(f"{name} is on {t.device} but input is on {input.device}")
    if groups <= 0:
        fail(f"groups must be positive, got {groups}")
    if any(s <= 0 for s in stride):
        fail(f"stride must be positive, got {list(stride)}")
    if any(d <= 0 for d in dilation):
        fail(f"dilation must be positive, got {list(dilation)}")
    if any(p < 0 for p in padding):
        fail(f"padding must be non-negative, got {list(padding)}")
    B, C, H, W = input.shape
    K, cg, dv, _ = weight_v.shape
    N, kg, _, dh = weight_h.shape
    if K == 0 or cg == 0 or dv == 0:
        fail(f"weight_v must not be empty, got shape {tuple(weight_v.shape)}")
    if kg == 0 or dh == 0:
        fail(f"weight_h must not be empty, got shape {tuple(weight_h.shape)}")
    if C % groups != 0 or cg * groups != C:
        fail(f"weight_v expects {cg} input channels per group and groups={groups}, but input has {C} channels")
    if K % groups != 0:
        fail(f"weight_v has {K} output channels, not divisible by groups={groups}")
    if kg * groups != K:
        fail(f"weight_h expects {kg} channels per group (groups={groups}), but weight_v produces {K}")
    if N % groups != 0:
        fail(f"weight_h has {N} output channels, not divisible by groups={groups}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        fail(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    span_v = dilation[0] * (dv - 1) + 1
    span_h = dilation[1] * (dh - 1) + 1
    if H + 2 * padding[0] < span_v:
        fail(f"weight_v's dilated height {span_v} is larger than the padded input height {H + 2 * padding[0]}")
    if W + 2 * padding[1] < span_h:
        fail(f"weight_h's dilated width {span_h} is larger than the padded input width {W + 2 * padding[1]}")
    return (
        B,
        N,
        _conv_out_size(H, dv, stride[0], padding[0], dilation[0]),
        _conv_out_size(W, dh, stride[1], padding[1], dilation[1]),
    )
