"""Triton kernels for sep_conv (the CUDA path of torch.ops.lowrank.sep_conv and its backward).

Notation (docs/design.md): input x (B, C, H, W), weight_v (K, C/G, dv, 1), weight_h (N, K/G, 1, dh),
intermediate t (B, K, H', W), output y (B, N, H', W'); per group Cg = C/G, Kg = K/G, Ng = N/G.

Forward (one launch, `_sep_conv_fwd_kernel`)
    A program owns one (batch, group, block of BLOCK_N output channels, tile of BLOCK_ROWS output rows x
    up to BLOCK_J output columns). For each block of BLOCK_K intermediate channels it computes the
    intermediate tile t[BLOCK_K, BLOCK_ROWS x BLOCK_COLS] in registers (stage 1: dv x ceil(Cg/BLOCK_C)
    tl.dot calls on row-shifted input loads), then applies the horizontal factor (stage 2: dh tl.dot
    calls). The intermediate never touches global memory.

    Halo: the BLOCK_COLS intermediate columns of a tile include the (dh-1)*dilation halo, so the
    intermediate columns of neighbouring tiles overlap and the halo columns are *recomputed* by both
    tiles (halo recompute, not per-tap recompute). Inside the program the tap shift is a register
    gather along the pixel axis (tl.gather with index q*stride + e*dilation), so stage 1 runs once per
    tile instead of dh times. Costs, per tile and per intermediate-channel block:
      - stage-1 FLOPs: 2 * BLOCK_K * Cg * dv * BLOCK_ROWS * BLOCK_COLS, of which a fraction
        ((dh-1)*dil_h) / BLOCK_COLS is halo recompute (3% for a 3-tap kernel and 64-column tiles;
        0 when a tile spans a whole padded row, which is what the host picks for W + 2*pad <= 64).
        Per-tap recompute would instead cost (dh-1) extra stage-1 passes (+200% for dh=3), which on
        VGG-like ranks (stage 1 ~ stage 2) erases most of the low-rank FLOP saving.
      - stage 1 is recomputed for each BLOCK_N block of one group: ceil(Ng/BLOCK_N) x stage-1 FLOPs.
        This is the real price of keeping t in registers (Triton gives no explicit shared-memory tile
        to hold all Kg channels of t). The autotuner therefore offers BLOCK_N up to 256 with narrower
        pixel tiles (BLOCK_N = 512 spilled registers when compiled for sm_90); for Ng <= 256 one block,
        i.e. no recompute, is among the candidates, for Ng = 512 stage 1 runs twice.
      - gather cost: dh * BLOCK_K * BLOCK_ROWS * BLOCK_J register moves (through shared memory on GPU),
        1/BLOCK_N of the stage-2 MACs.
      - bytes per tile: input (BLOCK_ROWS + (dv-1)*dil_v) x BLOCK_COLS x Cg elements per K block (rows
        that are re-read by dv taps come from L1/L2), weights (BLOCK_K*Cg*dv + BLOCK_N*BLOCK_K*dh), output
        BLOCK_N x BLOCK_ROWS x BLOCK_J. HBM traffic of the whole layer is ~ input + output (+ weights),
        i.e. the intermediate's 2 * B*K*H'*W elements of the unfused pair disappear.

    Expected H100 roofline (989 TFLOP/s dense bf16, ~3.35 TB/s): arithmetic intensity of the fused
    layer = FLOPs / (bytes of x + y). For VGG-16 conv3_1 at rank 64 (C=128, K=64, N=256, 56x56, bf16):
    FLOPs/pixel = 2*3*(64*128 + 256*64) = 147k, bytes/pixel = 2*(128 + 256) = 768 -> 192 FLOP/byte,
    below the ridge point of 989/3.35 = 295 FLOP/byte: memory bound at about 3.35 TB/s * 192 =
    640 TFLOP/s attainable; layers with rank >= 128 are compute bound. The unfused pair also moves the
    intermediate (2*2*64 more bytes/pixel), so it is bounded at 3.35 TB/s * 147k/1024 = 480 TFLOP/s.
    These are estimates from the roofline model, not measurements.

Backward (sep_conv_backward; bias is a sum in Python)
    gt = dL/dt = horizontal transposed conv of grad_out with weight_h.
    - grad_input (`_sep_conv_bwd_input_kernel`), fused: a program owns (batch, group, BLOCK_C input
      channels, tile of input rows x BLOCK_COLS columns). It computes gt for the intermediate rows the
      tile needs (BLOCK_TROWS rows, including the (dv-1)*dil_v row halo, recomputed by neighbouring
      tiles) straight from grad_out in registers, then applies weight_v^T with a row gather per
      vertical tap. gt is never written to memory. Costs: gt is recomputed per BLOCK_C block
      (ceil(Cg/BLOCK_C)); the row halo makes a tile compute BLOCK_TROWS gt rows for
      ROWS_PER_TILE = (BLOCK_TROWS-1)*stride_v - (dv-1)*dil_v + 1 input rows (8 rows for 6 with a
      3-tap kernel, hence 32-column tiles on GPU so that tiles are tall).
    - grad_weight_h (`_sep_conv_bwd_weight_h_kernel`), fused with a recompute of t: per tile of
      intermediate pixels, t[BLOCK_K, P] is recomputed from x (stage 1) and multiplied by the dh
      column-shifted views of grad_out, stacked into one [DH_PAD*BLOCK_N, P] operand (shifted loads come
      straight from global memory, so there is no halo). Without the recompute t would have to be saved
      by the forward (a full intermediate-sized tensor).
    - grad_weight_v (`_sep_conv_bwd_weight_v_kernel`), fused with a recompute of gt: per pixel tile,
      gt[BLOCK_K, P] from grad_out, times the dv row-shifted views of x stacked as [DV_PAD*BLOCK_C, P].
    Weight kernels split the pixel reduction over SPLITS programs writing fp32 partial sums that the host
    adds with one deterministic torch.sum (no atomics). The three kernels recompute gt twice and t once
    instead of materializing them: each recompute is one stage's FLOPs, which is cheap where the layer
    is memory bound (the early, wide layers, where the unfused pair hurts most), while materializing
    costs a write + read of a B*K*H'*W tensor. On compute-bound layers (rank >= 128) materializing gt
    once could be faster; only a GPU measurement can tell.

Precision: fp32 accumulation for fp16/bf16/fp32 (fp64 accumulates in fp64). The intermediate is rounded
to the input dtype before the second tl.dot, like the unfused reference. fp32 dots use
input_precision="ieee" unless torch.backends.cuda.matmul.allow_tf32 is set on a GPU (then "tf32").
Under TRITON_INTERPRET=1 every kernel uses exactly one small fixed config.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from .._conv_args import _check_sep_conv
from ..sep_conv import _sep_conv_grads, _setup_context

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TORCH_TO_TL_ACC = {
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _configs(names: tuple[str, ...], gpu: list[tuple], interp: tuple) -> list[triton.Config]:
    """Autotune configs: rows of (*block sizes, num_warps, num_stages); one fixed config in the interpreter."""
    if _INTERPRET:
        return [triton.Config(dict(zip(names, interp)), num_warps=4, num_stages=1)]
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in gpu]


_MAX_TILE_ELEMENTS = 16384  # one fp32 register tile (64 KB): 64 registers per thread at 8 warps


def _prune(limits: dict[str, str], tiles=None):
    """Drop configs whose channel blocks are far larger than the channels they cover, and configs whose
    register tiles (`tiles(args)` -> element counts) would spill; keep at least the smallest config."""

    def prune(configs, named_args, **kwargs):
        smallest = {block: min(c.kwargs[block] for c in configs) for block in limits}
        kept = []
        for c in configs:
            args = {**named_args, **kwargs, **c.kwargs}
            if any(c.kwargs[b] > max(smallest[b], _pow2(named_args[dim])) for b, dim in limits.items()):
                continue
            if tiles is not None and max(tiles(args)) > _MAX_TILE_ELEMENTS:
                continue
            kept.append(c)
        return kept or [min(configs, key=lambda c: sum(c.kwargs.values()))]

    return prune


# ----------------------------------------------------------------------------------------------- forward

# Every GPU config below was compiled for sm_80 and sm_90 (fp16, triton 3.9 and its ptxas, no GPU
# needed: tests/triton_compile_check.py --all-configs --arch 80 90) at a VGG conv3_1 shape: all fit in
# 255 registers, spilling at most 64 bytes (2 of 48 builds, on sm_80). BLOCK_N = 512 (16 warps, 128
# registers) and BLOCK_K = 64 spilled more, so they are out. num_stages 2 vs 3 gave the same shared
# memory: the nested tap/channel loops are not software-pipelined.
_FWD_CONFIGS = _configs(
    ("BLOCK_N", "BLOCK_K", "BLOCK_C", "TILE_PIXELS"),
    [
        (32, 32, 32, 128, 4, 2),
        (64, 32, 32, 64, 4, 2),
        (64, 32, 32, 128, 4, 2),
        (128, 32, 32, 64, 8, 2),
        (128, 32, 32, 128, 8, 3),
        # Wide output-channel blocks avoid recomputing stage 1 per block; they need narrow tiles.
        (256, 32, 32, 32, 8, 2),
    ],
    (16, 16, 16, 64),
)


def _fwd_rows(args) -> int:
    rows = max(1, args["TILE_PIXELS"] // args["BLOCK_COLS"])
    rows = min(rows, _pow2(args["OH"]))
    return max(rows, 16 // args["BLOCK_J"], 1)  # tl.dot needs >= 16 columns


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["CG", "KG", "NG", "OH", "OW", "DV", "DH", "SH", "BLOCK_COLS"],
    prune_configs_by={
        "early_config_prune": _prune(
            {"BLOCK_N": "NG", "BLOCK_K": "KG", "BLOCK_C": "CG"},
            lambda a: (a["BLOCK_N"] * _fwd_rows(a) * a["BLOCK_J"], a["BLOCK_K"] * _fwd_rows(a) * a["BLOCK_COLS"]),
        )
    },
)
@triton.heuristics({"BLOCK_ROWS": _fwd_rows})
@triton.jit
def _sep_conv_fwd_kernel(
    x_ptr,
    wv_ptr,
    wh_ptr,
    bias_ptr,
    y_ptr,
    H,
    W,
    OH,
    OW,
    CG,
    KG,
    NG,
    DV,
    DH,
    SV,
    SH,
    PV,
    PH,
    LV,
    LH,
    sxb,
    sxc,
    sxh,
    sxw,
    syb,
    syc,
    syh,
    syw,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILE_PIXELS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    TP: tl.constexpr = BLOCK_ROWS * BLOCK_COLS  # intermediate pixels per tile (with halo columns)
    OP: tl.constexpr = BLOCK_ROWS * BLOCK_J  # output pixels per tile
    cols_per_tile = (BLOCK_COLS - 1 - (DH - 1) * LH) // SH + 1
    n_col_tiles = tl.cdiv(OW, cols_per_tile)
    n_row_tiles = tl.cdiv(OH, BLOCK_ROWS)
    n_blocks = tl.cdiv(NG, BLOCK_N)
    pid = tl.program_id(0)
    col_tile = pid % n_col_tiles
    row_tile = (pid // n_col_tiles) % n_row_tiles
    b = pid // (n_col_tiles * n_row_tiles)
    g = tl.program_id(1) // n_blocks
    nb = tl.program_id(1) % n_blocks
    j0 = col_tile * cols_per_tile
    i0 = row_tile * BLOCK_ROWS

    pt = tl.arange(0, TP)
    t_row = i0 + pt // BLOCK_COLS
    t_col = j0 * SH - PH + pt % BLOCK_COLS
    t_col_ok = (t_col >= 0) & (t_col < W) & (t_row < OH)
    po = tl.arange(0, OP)
    o_r = po // BLOCK_J
    o_q = po % BLOCK_J
    o_row = i0 + o_r
    o_col = j0 + o_q
    o_ok = (o_q < cols_per_tile) & (o_row < OH) & (o_col < OW)

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NG
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    x_base = x_ptr + b.to(tl.int64) * sxb + (g * CG).to(tl.int64) * sxc
    wv_base = wv_ptr + (g * DV).to(tl.int64) * KG * CG  # weight_v packed (G, dv, Kg, Cg)
    wh_base = wh_ptr + (g * DH).to(tl.int64) * NG * KG  # weight_h packed (G, dh, Ng, Kg)

    acc = tl.zeros([BLOCK_N, OP], dtype=ACC_DTYPE)
    for k0 in range(0, KG, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < KG
        # Stage 1: the intermediate tile, halo columns included, in registers.
        t = tl.zeros([BLOCK_K, TP], dtype=ACC_DTYPE)
        for a in range(0, DV):
            in_row = t_row * SV - PV + a * LV
            pix_ok = t_col_ok & (in_row >= 0) & (in_row < H)
            x_pix = in_row.to(tl.int64) * sxh + t_col.to(tl.int64) * sxw
            for c0 in range(0, CG, BLOCK_C):
                cc = c0 + offs_c
                c_ok = cc < CG
                xt = tl.load(
                    x_base + cc[:, None].to(tl.int64) * sxc + x_pix[None, :],
                    mask=c_ok[:, None] & pix_ok[None, :],
                    other=0.0,
                )
                wvt = tl.load(
                    wv_base + (a * KG + kk[:, None]) * CG + cc[None, :],
                    mask=k_ok[:, None] & c_ok[None, :],
                    other=0.0,
                )
                t = tl.dot(wvt, xt, t, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        t_in = t.to(x_ptr.dtype.element_ty)
        # Stage 2: tap e reads intermediate column q*SH + e*LH of the tile (a register gather).
        for e in range(0, DH):
            idx = o_r * BLOCK_COLS + tl.minimum(o_q * SH + e * LH, BLOCK_COLS - 1)
            te = tl.gather(t_in, tl.broadcast_to(idx[None, :], [BLOCK_K, OP]), 1)
            wht = tl.load(
                wh_base + (e * NG + offs_n[:, None]) * KG + kk[None, :],
                mask=n_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(wht, te, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + g * NG + offs_n, mask=n_ok, other=0.0)
        acc += bias.to(ACC_DTYPE)[:, None]
    y_ptrs = (
        y_ptr
        + b.to(tl.int64) * syb
        + (g * NG + offs_n)[:, None].to(tl.int64) * syc
        + (o_row.to(tl.int64) * syh + o_col.to(tl.int64) * syw)[None, :]
    )
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & o_ok[None, :])


# --------------------------------------------------------------------------------------- grad_input

_BWD_INPUT_CONFIGS = _configs(
    ("BLOCK_C", "BLOCK_K", "BLOCK_N", "TILE_PIXELS"),
    [
        (32, 32, 32, 128, 4, 2),
        (64, 32, 32, 128, 4, 2),
        (64, 32, 32, 256, 8, 2),
        # Wide input-channel blocks avoid recomputing gt per block.
        (128, 32, 32, 128, 8, 2),
    ],
    (16, 16, 16, 64),
)


def _bwd_input_rows(args) -> tuple[int, int, int]:
    """(intermediate rows computed per tile, input rows produced per tile, their pow2 block)."""
    halo = (args["DV"] - 1) * args["LV"]
    sv = args["SV"]
    trows = _pow2(max(args["TILE_PIXELS"] // args["BLOCK_COLS"], -(-halo // sv) + 1))
    rows = min((trows - 1) * sv - halo + 1, args["H"])
    block = _pow2(rows)
    while block * args["BLOCK_COLS"] < 16:  # tl.dot needs >= 16 columns
        block *= 2
    return trows, rows, block


@triton.autotune(
    configs=_BWD_INPUT_CONFIGS,
    key=["CG", "KG", "NG", "H", "W", "DV", "DH", "SV", "LV", "BLOCK_COLS"],
    prune_configs_by={
        "early_config_prune": _prune(
            {"BLOCK_N": "NG", "BLOCK_K": "KG", "BLOCK_C": "CG"},
            lambda a: (
                a["BLOCK_C"] * _bwd_input_rows(a)[2] * a["BLOCK_COLS"],
                a["BLOCK_K"] * _bwd_input_rows(a)[0] * a["BLOCK_COLS"],
            ),
        )
    },
)
@triton.heuristics(
    {
        "BLOCK_TROWS": lambda a: _bwd_input_rows(a)[0],
        "ROWS_PER_TILE": lambda a: _bwd_input_rows(a)[1],
        "BLOCK_ROWS": lambda a: _bwd_input_rows(a)[2],
    }
)
@triton.jit
def _sep_conv_bwd_input_kernel(
    gy_ptr,
    wv_ptr,
    wh_ptr,
    gx_ptr,
    H,
    W,
    OH,
    OW,
    CG,
    KG,
    NG,
    DV,
    DH,
    SV,
    SH,
    PV,
    PH,
    LV,
    LH,
    sgb,
    sgc,
    sgh,
    sgw,
    sxb,
    sxc,
    sxh,
    sxw,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_PIXELS: tl.constexpr,
    BLOCK_TROWS: tl.constexpr,
    ROWS_PER_TILE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    TP: tl.constexpr = BLOCK_TROWS * BLOCK_COLS  # gt pixels per tile (with halo rows)
    OP: tl.constexpr = BLOCK_ROWS * BLOCK_COLS  # grad_input pixels per tile
    n_col_tiles = tl.cdiv(W, BLOCK_COLS)
    n_row_tiles = tl.cdiv(H, ROWS_PER_TILE)
    n_blocks = tl.cdiv(CG, BLOCK_C)
    pid = tl.program_id(0)
    col_tile = pid % n_col_tiles
    row_tile = (pid // n_col_tiles) % n_row_tiles
    b = pid // (n_col_tiles * n_row_tiles)
    g = tl.program_id(1) // n_blocks
    cb = tl.program_id(1) % n_blocks
    h0 = row_tile * ROWS_PER_TILE
    w0 = col_tile * BLOCK_COLS
    # First intermediate row the tile needs: ceil((h0 + PV - (DV-1)*LV) / SV), kept non-negative for //.
    halo = (DV - 1) * LV
    i_lo = (h0 + PV - halo + halo * SV + SV - 1) // SV - halo

    pt = tl.arange(0, TP)
    t_row = i_lo + pt // BLOCK_COLS
    t_col = w0 + pt % BLOCK_COLS
    t_ok = (t_row >= 0) & (t_row < OH) & (t_col < W)
    po = tl.arange(0, OP)
    o_r = po // BLOCK_COLS
    o_s = po % BLOCK_COLS
    h = h0 + o_r
    w = w0 + o_s
    o_ok = (o_r < ROWS_PER_TILE) & (h < H) & (w < W)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < CG
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    gy_base = gy_ptr + b.to(tl.int64) * sgb + (g * NG).to(tl.int64) * sgc
    wv_base = wv_ptr + (g * DV).to(tl.int64) * CG * KG  # weight_v packed (G, dv, Cg, Kg)
    wh_base = wh_ptr + (g * DH).to(tl.int64) * KG * NG  # weight_h packed (G, dh, Kg, Ng)

    acc = tl.zeros([BLOCK_C, OP], dtype=ACC_DTYPE)
    for k0 in range(0, KG, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < KG
        # gt tile (halo rows included) from grad_out: gt[k, i, w] = sum_{n,e} wh[n,k,e] gy[n, i, j],
        # w = j*SH - PH + e*LH.
        gt = tl.zeros([BLOCK_K, TP], dtype=ACC_DTYPE)
        for e in range(0, DH):
            num = t_col + PH - e * LH
            j = tl.maximum(num, 0) // SH
            pix_ok = t_ok & (num >= 0) & (tl.maximum(num, 0) % SH == 0) & (j < OW)
            gy_pix = t_row.to(tl.int64) * sgh + j.to(tl.int64) * sgw
            for n0 in range(0, NG, BLOCK_N):
                nn = n0 + offs_n
                n_ok = nn < NG
                gyt = tl.load(
                    gy_base + nn[:, None].to(tl.int64) * sgc + gy_pix[None, :],
                    mask=n_ok[:, None] & pix_ok[None, :],
                    other=0.0,
                )
                wht = tl.load(
                    wh_base + (e * KG + kk[:, None]) * NG + nn[None, :],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )
                gt = tl.dot(wht, gyt, gt, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        gt_in = gt.to(gy_ptr.dtype.element_ty)
        # grad_input[c, h, w] += sum_{k,a} wv[k,c,a] gt[k, i, w] with h = i*SV - PV + a*LV.
        for a in range(0, DV):
            num = h + PV - a * LV
            i = tl.maximum(num, 0) // SV
            row_ok = (num >= 0) & (tl.maximum(num, 0) % SV == 0) & (i < OH)
            local = tl.minimum(tl.maximum(i - i_lo, 0), BLOCK_TROWS - 1)
            idx = local * BLOCK_COLS + o_s
            ga = tl.gather(gt_in, tl.broadcast_to(idx[None, :], [BLOCK_K, OP]), 1)
            ga = tl.where(row_ok[None, :], ga, tl.zeros_like(ga))
            wvt = tl.load(
                wv_base + (a * CG + offs_c[:, None]) * KG + kk[None, :],
                mask=c_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(wvt, ga, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    gx_ptrs = (
        gx_ptr
        + b.to(tl.int64) * sxb
        + (g * CG + offs_c)[:, None].to(tl.int64) * sxc
        + (h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[None, :]
    )
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=c_ok[:, None] & o_ok[None, :])


# ----------------------------------------------------------------------------------- weight gradients

_BWD_WEIGHT_CONFIGS = _configs(
    ("BLOCK_K", "BLOCK_X", "BLOCK_R", "BLOCK_P"),
    [
        (32, 16, 32, 64, 4, 2),
        (32, 32, 32, 64, 4, 2),
        (32, 16, 32, 128, 4, 2),
        (32, 32, 32, 128, 8, 2),
        (64, 16, 32, 128, 8, 2),
        (64, 32, 32, 64, 8, 2),
        (64, 64, 32, 64, 8, 2),
    ],
    (16, 16, 16, 64),
)


@triton.autotune(
    configs=_BWD_WEIGHT_CONFIGS,
    key=["B", "CG", "KG", "NG", "OH", "W", "DV", "DH", "SPLITS"],
    prune_configs_by={
        "early_config_prune": _prune(
            {"BLOCK_K": "KG", "BLOCK_X": "NG", "BLOCK_R": "CG"},
            lambda a: (a["DH_PAD"] * a["BLOCK_X"] * a["BLOCK_K"], a["BLOCK_K"] * a["BLOCK_P"]),
        )
    },
)
@triton.jit
def _sep_conv_bwd_weight_h_kernel(
    x_ptr,
    gy_ptr,
    wv_ptr,
    part_ptr,
    B,
    H,
    W,
    OH,
    OW,
    CG,
    KG,
    NG,
    N,
    DV,
    DH,
    SV,
    SH,
    PV,
    PH,
    LV,
    LH,
    sxb,
    sxc,
    sxh,
    sxw,
    sgb,
    sgc,
    sgh,
    sgw,
    SPLITS,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    DH_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_X: tl.constexpr,  # block of output channels n
    BLOCK_R: tl.constexpr,  # block of input channels c (stage-1 recompute)
    BLOCK_P: tl.constexpr,
):
    # part[split, g*NG + n, k, e] = sum over this split's pixels of gy[n, i, j] * t[k, i, j*SH - PH + e*LH].
    split = tl.program_id(0)
    n_kblk = tl.cdiv(KG, BLOCK_K)
    n_nblk = tl.cdiv(NG, BLOCK_X)
    pid = tl.program_id(1)
    kb = pid % n_kblk
    nb = (pid // n_kblk) % n_nblk
    g = pid // (n_kblk * n_nblk)
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < KG
    offs_c = tl.arange(0, BLOCK_R)
    rows = tl.arange(0, DH_PAD * BLOCK_X)
    e_of_row = rows // BLOCK_X
    n_of_row = nb * BLOCK_X + rows % BLOCK_X
    row_ok = (e_of_row < DH) & (n_of_row < NG)
    wv_base = wv_ptr + (g * DV).to(tl.int64) * KG * CG  # weight_v packed (G, dv, Kg, Cg)
    n_pix = tl.cast(B, tl.int64) * OH * W  # pixel indices can pass 2**31
    acc = tl.zeros([DH_PAD * BLOCK_X, BLOCK_K], dtype=ACC_DTYPE)
    for tile in range(split, tl.cdiv(n_pix, BLOCK_P), SPLITS):
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < n_pix
        w = p % W
        i = (p // W) % OH
        b = (p // W // OH).to(tl.int64)
        t = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC_DTYPE)
        for a in range(0, DV):
            in_row = i * SV - PV + a * LV
            pix_ok = p_ok & (in_row >= 0) & (in_row < H)
            x_pix = b * sxb + in_row.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            for c0 in range(0, CG, BLOCK_R):
                cc = c0 + offs_c
                c_ok = cc < CG
                xt = tl.load(
                    x_ptr + (g * CG + cc)[:, None].to(tl.int64) * sxc + x_pix[None, :],
                    mask=c_ok[:, None] & pix_ok[None, :],
                    other=0.0,
                )
                wvt = tl.load(
                    wv_base + (a * KG + kk[:, None]) * CG + cc[None, :],
                    mask=k_ok[:, None] & c_ok[None, :],
                    other=0.0,
                )
                t = tl.dot(wvt, xt, t, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        t_in = t.to(x_ptr.dtype.element_ty)
        # Row (e, n) of the stacked operand at pixel (i, w) holds gy[n, i, j] where w = j*SH - PH + e*LH.
        num = w[None, :] + PH - e_of_row[:, None] * LH
        j = tl.maximum(num, 0) // SH
        ok = row_ok[:, None] & p_ok[None, :] & (num >= 0) & (tl.maximum(num, 0) % SH == 0) & (j < OW)
        gys = tl.load(
            gy_ptr
            + b[None, :] * sgb
            + (g * NG + n_of_row)[:, None].to(tl.int64) * sgc
            + i[None, :].to(tl.int64) * sgh
            + j.to(tl.int64) * sgw,
            mask=ok,
            other=0.0,
        )
        acc = tl.dot(gys, tl.trans(t_in), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    out = (
        part_ptr
        + split.to(tl.int64) * N * KG * DH
        + ((g * NG + n_of_row)[:, None].to(tl.int64) * KG + kk[None, :]) * DH
        + e_of_row[:, None]
    )
    tl.store(out, acc, mask=row_ok[:, None] & k_ok[None, :])


@triton.autotune(
    configs=_BWD_WEIGHT_CONFIGS,
    key=["B", "CG", "KG", "NG", "OH", "W", "DV", "DH", "SPLITS"],
    prune_configs_by={
        "early_config_prune": _prune(
            {"BLOCK_K": "KG", "BLOCK_X": "CG", "BLOCK_R": "NG"},
            lambda a: (a["DV_PAD"] * a["BLOCK_X"] * a["BLOCK_K"], a["BLOCK_K"] * a["BLOCK_P"]),
        )
    },
)
@triton.jit
def _sep_conv_bwd_weight_v_kernel(
    x_ptr,
    gy_ptr,
    wh_ptr,
    part_ptr,
    B,
    H,
    W,
    OH,
    OW,
    CG,
    KG,
    NG,
    K,
    DV,
    DH,
    SV,
    SH,
    PV,
    PH,
    LV,
    LH,
    sxb,
    sxc,
    sxh,
    sxw,
    sgb,
    sgc,
    sgh,
    sgw,
    SPLITS,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_X: tl.constexpr,  # block of input channels c
    BLOCK_R: tl.constexpr,  # block of output channels n (gt recompute)
    BLOCK_P: tl.constexpr,
):
    # part[split, g*KG + k, c, a] = sum over this split's pixels of gt[k, i, w] * x[c, i*SV - PV + a*LV, w].
    split = tl.program_id(0)
    n_kblk = tl.cdiv(KG, BLOCK_K)
    n_cblk = tl.cdiv(CG, BLOCK_X)
    pid = tl.program_id(1)
    kb = pid % n_kblk
    cb = (pid // n_kblk) % n_cblk
    g = pid // (n_kblk * n_cblk)
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < KG
    offs_n = tl.arange(0, BLOCK_R)
    rows = tl.arange(0, DV_PAD * BLOCK_X)
    a_of_row = rows // BLOCK_X
    c_of_row = cb * BLOCK_X + rows % BLOCK_X
    row_ok = (a_of_row < DV) & (c_of_row < CG)
    wh_base = wh_ptr + (g * DH).to(tl.int64) * KG * NG  # weight_h packed (G, dh, Kg, Ng)
    n_pix = tl.cast(B, tl.int64) * OH * W  # pixel indices can pass 2**31
    acc = tl.zeros([BLOCK_K, DV_PAD * BLOCK_X], dtype=ACC_DTYPE)
    for tile in range(split, tl.cdiv(n_pix, BLOCK_P), SPLITS):
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < n_pix
        w = p % W
        i = (p // W) % OH
        b = (p // W // OH).to(tl.int64)
        gt = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC_DTYPE)
        for e in range(0, DH):
            num = w + PH - e * LH
            j = tl.maximum(num, 0) // SH
            pix_ok = p_ok & (num >= 0) & (tl.maximum(num, 0) % SH == 0) & (j < OW)
            gy_pix = b * sgb + i.to(tl.int64) * sgh + j.to(tl.int64) * sgw
            for n0 in range(0, NG, BLOCK_R):
                nn = n0 + offs_n
                n_ok = nn < NG
                gyt = tl.load(
                    gy_ptr + (g * NG + nn)[:, None].to(tl.int64) * sgc + gy_pix[None, :],
                    mask=n_ok[:, None] & pix_ok[None, :],
                    other=0.0,
                )
                wht = tl.load(
                    wh_base + (e * KG + kk[:, None]) * NG + nn[None, :],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )
                gt = tl.dot(wht, gyt, gt, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        gt_in = gt.to(gy_ptr.dtype.element_ty)
        # Row (a, c) of the stacked operand at pixel (i, w) holds x[c, i*SV - PV + a*LV, w].
        in_row = i[None, :] * SV - PV + a_of_row[:, None] * LV
        ok = row_ok[:, None] & p_ok[None, :] & (in_row >= 0) & (in_row < H)
        xs = tl.load(
            x_ptr
            + b[None, :] * sxb
            + (g * CG + c_of_row)[:, None].to(tl.int64) * sxc
            + in_row.to(tl.int64) * sxh
            + w[None, :].to(tl.int64) * sxw,
            mask=ok,
            other=0.0,
        )
        acc = tl.dot(gt_in, tl.trans(xs), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    out = (
        part_ptr
        + split.to(tl.int64) * K * CG * DV
        + ((g * KG + kk)[:, None].to(tl.int64) * CG + c_of_row[None, :]) * DV
        + a_of_row[None, :]
    )
    tl.store(out, acc, mask=k_ok[:, None] & row_ok[None, :])


# ------------------------------------------------------------------------------------------ host side


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not _INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _acc_dtype(dtype: torch.dtype):
    try:
        return _TORCH_TO_TL_ACC[dtype]
    except KeyError:
        raise ValueError(f"sep_conv (triton): unsupported dtype {dtype}") from None


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"lowrank_kernels.triton.sep_conv needs CUDA tensors (got {t.device}); CPU tensors only run under "
            "TRITON_INTERPRET=1 set before triton is imported"
        )


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _geometry(x, weight_v, weight_h, stride, padding, dilation, groups) -> dict:
    B, C, H, W = x.shape
    K, CG, DV, _ = weight_v.shape
    N, KG, _, DH = weight_h.shape
    return dict(
        B=B,
        H=H,
        W=W,
        CG=CG,
        KG=KG,
        NG=N // groups,
        N=N,
        K=K,
        DV=DV,
        DH=DH,
        SV=stride[0],
        SH=stride[1],
        PV=padding[0],
        PH=padding[1],
        LV=dilation[0],
        LH=dilation[1],
    )


def _pack_weight(weight: torch.Tensor, groups: int, transposed: bool = False) -> torch.Tensor:
    """weight_v (K, Cg, dv, 1) or weight_h (N, Kg, 1, dh) packed tap-major per group, as
    (G, taps, out, in), or (G, taps, in, out) if transposed, so that a kernel's [out, in] (or [in, out])
    weight tile is a row-contiguous, vectorizable load. Weights are small; this is one copy."""
    out_ch, in_ch = weight.shape[:2]
    w = weight.reshape(groups, out_ch // groups, in_ch, weight.shape[2] * weight.shape[3])
    return (w.permute(0, 3, 2, 1) if transposed else w.permute(0, 3, 1, 2)).contiguous()


def _fwd_columns(OW: int, DH: int, LH: int, SH: int) -> tuple[int, int, int]:
    """Forward tile width: (BLOCK_COLS intermediate columns incl. halo, output columns per tile, BLOCK_J)."""
    max_cols = 16 if _INTERPRET else 64
    halo = (DH - 1) * LH
    row_span = (OW - 1) * SH + halo + 1  # intermediate columns one whole output row needs
    block_cols = _pow2(row_span) if row_span <= max_cols else max(max_cols, _pow2(halo + 1 + SH))
    cols_per_tile = (block_cols - 1 - halo) // SH + 1
    return block_cols, cols_per_tile, _pow2(min(cols_per_tile, OW))


def _bwd_input_columns(W: int) -> int:
    # Narrow tiles, so a tile has enough rows to amortize the vertical halo.
    return min(_pow2(W), 16 if _INTERPRET else 32)


def sep_conv_forward(
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """The fused forward on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); int[2] conv args."""
    with _on_device(input):
        return _forward(input, weight_v, weight_h, bias, stride, padding, dilation, groups)


def _forward(
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    B, N, OH, OW = _check_sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
    _check_device(input)
    acc_dtype = _acc_dtype(input.dtype)
    out = torch.empty((B, N, OH, OW), dtype=input.dtype, device=input.device).contiguous(
        memory_format=suggest_memory_format(input)
    )
    if out.numel() == 0:
        return out
    geo = _geometry(input, weight_v, weight_h, stride, padding, dilation, groups)
    block_cols, cols_per_tile, block_j = _fwd_columns(OW, geo["DH"], geo["LH"], geo["SH"])
    wv = _pack_weight(weight_v, groups)
    wh = _pack_weight(weight_h, groups)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else wv  # never read without HAS_BIAS

    def grid(meta):
        n_tiles = B * triton.cdiv(OH, meta["BLOCK_ROWS"]) * triton.cdiv(OW, cols_per_tile)
        return (n_tiles, groups * triton.cdiv(geo["NG"], meta["BLOCK_N"]))

    _sep_conv_fwd_kernel[grid](
        input,
        wv,
        wh,
        bias_arg,
        out,
        geo["H"],
        geo["W"],
        OH,
        OW,
        geo["CG"],
        geo["KG"],
        geo["NG"],
        geo["DV"],
        geo["DH"],
        geo["SV"],
        geo["SH"],
        geo["PV"],
        geo["PH"],
        geo["LV"],
        geo["LH"],
        *input.stride(),
        *out.stride(),
        HAS_BIAS=has_bias,
        ACC_DTYPE=acc_dtype,
        PRECISION=_precision(input.dtype),
        BLOCK_COLS=block_cols,
        BLOCK_J=block_j,
    )
    return out


def _splits(n_pix: int, programs_per_split: int, device: torch.device) -> int:
    """How many programs share the pixel reduction of the weight gradients."""
    if _INTERPRET:
        return max(1, min(2, triton.cdiv(n_pix, 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n_pix, 128), triton.cdiv(4 * sms, max(programs_per_split, 1))))


def sep_conv_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight_v, grad_weight_h); an empty tensor for a gradient not in output_mask."""
    with _on_device(input):
        return _backward(grad_out, input, weight_v, weight_h, stride, padding, dilation, groups, output_mask)


def _backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight_v: torch.Tensor,
    weight_h: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, OH, OW = _check_sep_conv(input, weight_v, weight_h, None, stride, padding, dilation, groups)
    _check_device(input)
    if grad_out.dim() != 4 or tuple(grad_out.shape) != (B, N, OH, OW):
        raise ValueError(f"sep_conv_backward: grad_out has shape {tuple(grad_out.shape)}, expected {(B, N, OH, OW)}")
    if grad_out.dtype != input.dtype or grad_out.device != input.device:
        raise ValueError(
            f"sep_conv_backward: grad_out ({grad_out.dtype}, {grad_out.device}) must match input "
            f"({input.dtype}, {input.device})"
        )
    acc_dtype = _acc_dtype(input.dtype)
    precision = _precision(input.dtype)
    geo = _geometry(input, weight_v, weight_h, stride, padding, dilation, groups)
    fmt = suggest_memory_format(input)
    wv = _pack_weight(weight_v, groups)  # [Kg, Cg] tiles (grad_weight_h recomputes t)
    wv_t = _pack_weight(weight_v, groups, transposed=True)  # [Cg, Kg] tiles (grad_input)
    wh_t = _pack_weight(weight_h, groups, transposed=True)  # [Kg, Ng] tiles (grad_input, grad_weight_v)
    empty = input.new_empty((0,))
    common = [
        geo["H"],
        geo["W"],
        OH,
        OW,
        geo["CG"],
        geo["KG"],
        geo["NG"],
    ]
    conv = [geo[k] for k in ("DV", "DH", "SV", "SH", "PV", "PH", "LV", "LH")]
    nothing_flows = grad_out.numel() == 0  # batch 0 or N == 0: every gradient is zero

    grad_input = empty
    if output_mask[0]:
        grad_input = torch.empty_like(input, memory_format=fmt)
        if nothing_flows:
            grad_input.zero_()
        elif grad_input.numel():
            block_cols = _bwd_input_columns(geo["W"])

            def grid_x(meta):
                n_tiles = B * triton.cdiv(geo["H"], meta["ROWS_PER_TILE"]) * triton.cdiv(geo["W"], block_cols)
                return (n_tiles, groups * triton.cdiv(geo["CG"], meta["BLOCK_C"]))

            _sep_conv_bwd_input_kernel[grid_x](
                grad_out,
                wv_t,
                wh_t,
                grad_input,
                *common,
                *conv,
                *grad_out.stride(),
                *grad_input.stride(),
                ACC_DTYPE=acc_dtype,
                PRECISION=precision,
                BLOCK_COLS=block_cols,
            )

    n_pix = B * OH * geo["W"]
    grad_wv = empty
    if output_mask[1]:
        if nothing_flows:
            grad_wv = torch.zeros_like(weight_v, memory_format=torch.contiguous_format)
        else:
            splits = _splits(n_pix, groups * triton.cdiv(geo["KG"], 64) * triton.cdiv(geo["CG"], 64), input.device)
            part = torch.empty((splits, *weight_v.shape[:3]), dtype=torch.float32, device=input.device)
            if acc_dtype == tl.float64:
                part = part.double()

            def grid_v(meta):
                return (
                    splits,
                    groups * triton.cdiv(geo["KG"], meta["BLOCK_K"]) * triton.cdiv(geo["CG"], meta["BLOCK_X"]),
                )

            _sep_conv_bwd_weight_v_kernel[grid_v](
                input,
                grad_out,
                wh_t,
                part,
                B,
                *common,
                geo["K"],
                *conv,
                *input.stride(),
                *grad_out.stride(),
                splits,
                ACC_DTYPE=acc_dtype,
                PRECISION=precision,
                DV_PAD=_pow2(geo["DV"]),
            )
            grad_wv = part.sum(0).to(weight_v.dtype).view(weight_v.shape)

    grad_wh = empty
    if output_mask[2]:
        if nothing_flows:
            grad_wh = torch.zeros_like(weight_h, memory_format=torch.contiguous_format)
        else:
            splits = _splits(n_pix, groups * triton.cdiv(geo["KG"], 64) * triton.cdiv(geo["NG"], 64), input.device)
            part = torch.empty((splits, N, geo["KG"], geo["DH"]), dtype=torch.float32, device=input.device)
            if acc_dtype == tl.float64:
                part = part.double()

            def grid_h(meta):
                return (
                    splits,
                    groups * triton.cdiv(geo["KG"], meta["BLOCK_K"]) * triton.cdiv(geo["NG"], meta["BLOCK_X"]),
                )

            _sep_conv_bwd_weight_h_kernel[grid_h](
                input,
                grad_out,
                wv,
                part,
                B,
                *common,
                N,
                *conv,
                *input.stride(),
                *grad_out.stride(),
                splits,
                ACC_DTYPE=acc_dtype,
                PRECISION=precision,
                DH_PAD=_pow2(geo["DH"]),
            )
            grad_wh = part.sum(0).to(weight_h.dtype).view(weight_h.shape)
    return grad_input, grad_wv, grad_wh


class _SepConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight_v, weight_h, bias, stride, padding, dilation, groups):
        inputs = (input, weight_v, weight_h, bias, stride, padding, dilation, groups)
        _setup_context(ctx, inputs, None)
        return sep_conv_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        return _sep_conv_grads(ctx, grad_out, sep_conv_backward)


def sep_conv(input, weight_v, weight_h, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """Differentiable Triton sep_conv with int[2] conv args, without the dispatcher (this is how the
    interpreter runs it on CPU tensors; on CUDA, lowrank_kernels.triton.sep_conv goes through the op)."""
    return _SepConvFunction.apply(input, weight_v, weight_h, bias, stride, padding, dilation, groups)
