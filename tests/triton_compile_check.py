"""Compile the Triton sep_conv kernels for NVIDIA targets on a machine without a GPU.

Triton lowers AST -> TTIR -> TTGIR -> LLVM IR -> PTX and runs its bundled ptxas to a cubin without
touching a device, so this catches what the interpreter cannot: dot shape/dtype rules, tl.gather
lowering, layouts, register allocation (spills). It must run with TRITON_INTERPRET unset (the test
runs it in a subprocess). Full sweep by hand:

    python tests/triton_compile_check.py --all-configs --arch 80 90 --dtype fp16 bf16 fp32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402,F401  (loads libtorch before the extension)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from lowrank_kernels.triton import sep_conv_kernels  # noqa: E402

# A VGG-16 conv3_1-like layer (C=128 -> K=64 -> N=256, 56x56, 3x3, padding 1) fixes the shape-derived
# constexprs; the kernels' code paths do not depend on the shape beyond those.
SHAPE = dict(B=8, H=56, W=56, OH=56, OW=56, CG=128, KG=64, NG=256, N=256, K=64, DV=3, DH=3)
SHAPE.update(SV=1, SH=1, PV=1, PH=1, LV=1, LH=1)


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _kernels(dtype: str):
    m = sep_conv_kernels
    acc = tl.float64 if dtype == "fp64" else tl.float32
    ptr, part = f"*{dtype}", ("*fp64" if dtype == "fp64" else "*fp32")
    common = dict(ACC_DTYPE=acc, PRECISION="ieee")
    block_cols, _, block_j = m._fwd_columns(SHAPE["OW"], SHAPE["DH"], SHAPE["LH"], SHAPE["SH"])
    bx_cols = m._bwd_input_columns(SHAPE["W"])
    fwd_extra = dict(common, HAS_BIAS=True, BLOCK_COLS=block_cols, BLOCK_J=block_j)
    return [
        (
            "forward",
            m._sep_conv_fwd_kernel,
            dict(x_ptr=ptr, wv_ptr=ptr, wh_ptr=ptr, bias_ptr=ptr, y_ptr=ptr),
            fwd_extra,
            lambda a: dict(BLOCK_ROWS=m._fwd_rows(a)),
        ),
        (
            "grad_input",
            m._sep_conv_bwd_input_kernel,
            dict(gy_ptr=ptr, wv_ptr=ptr, wh_ptr=ptr, gx_ptr=ptr),
            dict(common, BLOCK_COLS=bx_cols),
            lambda a: dict(zip(("BLOCK_TROWS", "ROWS_PER_TILE", "BLOCK_ROWS"), m._bwd_input_rows(a))),
        ),
        (
            "grad_weight_h",
            m._sep_conv_bwd_weight_h_kernel,
            dict(x_ptr=ptr, gy_ptr=ptr, wv_ptr=ptr, part_ptr=part),
            dict(common, DH_PAD=m._pow2(SHAPE["DH"])),
            lambda a: {},
        ),
        (
            "grad_weight_v",
            m._sep_conv_bwd_weight_v_kernel,
            dict(x_ptr=ptr, gy_ptr=ptr, wh_ptr=ptr, part_ptr=part),
            dict(common, DV_PAD=m._pow2(SHAPE["DV"])),
            lambda a: {},
        ),
    ]


def _resources(cubin: bytes) -> dict[str, int]:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    line = next((x for x in out.splitlines() if "REG:" in x), "")
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {k: int(fields[k]) for k in ("REG", "STACK") if k in fields}


# What the test compiles: every kernel for H100 in fp16, the forward for A100 in bf16 and in fp32 (ieee).
QUICK = [(90, "fp16", None), (80, "bf16", "forward"), (90, "fp32", "forward")]


def compile_kernels(archs, dtypes, all_configs: bool, only: str | None = None) -> list[str]:
    """Compile each kernel (every autotune config, or the one with the largest tiles); return report lines.
    Raises on the first compile error."""
    lines = []
    for dtype in dtypes:
        for name, kernel, ptrs, extra, heuristics in _kernels(dtype):
            if only is not None and name != only:
                continue
            fn = _jit(kernel)
            configs = kernel.configs
            if not all_configs:
                configs = [max(configs, key=lambda c: sorted(c.kwargs.values(), reverse=True))]
            for config in configs:
                args = {**SHAPE, **extra, **config.kwargs}
                constexprs = {**extra, **config.kwargs, **heuristics(args)}
                signature = {p.name: "constexpr" if p.is_constexpr else ptrs.get(p.name, "i32") for p in fn.params}
                source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                for arch in archs:
                    compiled = triton.compile(
                        source,
                        target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                    )
                    res = _resources(compiled.asm["cubin"])
                    lines.append(
                        f"sm_{arch} {dtype} {name} {config.kwargs} warps={config.num_warps} "
                        f"stages={config.num_stages}: registers {res.get('REG')}, spill stack {res.get('STACK')} B, "
                        f"shared {compiled.metadata.shared} B"
                    )
    return lines


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for real GPU targets")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--dtype", nargs="+", default=["fp16"], choices=["fp16", "bf16", "fp32", "fp64"])
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the test's selection (QUICK), ignores the rest")
    args = parser.parse_args()
    jobs = (
        [([a], [d], False, k) for a, d, k in QUICK] if args.quick else [(args.arch, args.dtype, args.all_configs, None)]
    )
    for job in jobs:
        for line in compile_kernels(*job):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
