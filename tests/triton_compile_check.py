"""Compile every Triton kernel (sep_conv, batched_svd, householder_product) for NVIDIA targets on a
machine without a GPU, and check that each configuration can launch.

Triton lowers AST -> TTIR -> TTGIR -> LLVM IR -> PTX and runs its bundled ptxas to a cubin without
touching a device, so this catches what the interpreter cannot: dot shape/dtype rules, tl.gather
lowering, layouts, register allocation (spills). Each line reports registers per thread, the spill
stack and shared memory; a configuration fails when the block cannot be resident on one SM (registers
times threads above the register file, shared memory above the architecture's per-block limit).
It must run with TRITON_INTERPRET unset (the test runs it in a subprocess).

    python tests/triton_compile_check.py            # the quick selection the test suite compiles
    python tests/triton_compile_check.py --all      # every kernel, config, dtype, sm_80 and sm_90
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402,F401  (loads libtorch before the extension)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from lowrank_kernels.triton import batched_svd_kernels, householder_product_kernels, sep_conv_kernels  # noqa: E402

# Per-SM register file (32-bit registers) and the most shared memory one block may use (bytes).
REGISTER_FILE = {80: 65536, 90: 65536}
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass
class Job:
    family: str
    name: str
    kernel: object  # a triton JITFunction (possibly wrapped by autotune/heuristics)
    dtype: str
    ptrs: dict[str, str]  # pointer argument -> "*fp32" etc.; other non-constexpr args are i32
    constexprs: dict
    num_warps: int
    num_stages: int
    scalars: dict[str, str] = dataclasses.field(default_factory=dict)  # non-pointer, non-i32 arguments

    def label(self) -> str:
        return (
            f"{self.family}/{self.name} {self.dtype} {self.constexprs} warps={self.num_warps} stages={self.num_stages}"
        )


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


# A VGG-16 conv3_1-like layer (C=128 -> K=64 -> N=256, 56x56, 3x3, padding 1) fixes the shape-derived
# constexprs of sep_conv; the kernels' code paths do not depend on the shape beyond those.
SHAPE = dict(B=8, H=56, W=56, OH=56, OW=56, CG=128, KG=64, NG=256, N=256, K=64, DV=3, DH=3)
SHAPE.update(SV=1, SH=1, PV=1, PH=1, LV=1, LH=1)


def sep_conv_jobs(dtype: str, all_configs: bool) -> list[Job]:
    m = sep_conv_kernels
    acc = tl.float64 if dtype == "fp64" else tl.float32
    ptr, part = f"*{dtype}", ("*fp64" if dtype == "fp64" else "*fp32")
    common = dict(ACC_DTYPE=acc, PRECISION="ieee")
    block_cols, _, block_j = m._fwd_columns(SHAPE["OW"], SHAPE["DH"], SHAPE["LH"], SHAPE["SH"])
    kernels: list[tuple[str, object, dict, dict, Callable]] = [
        (
            "forward",
            m._sep_conv_fwd_kernel,
            dict(x_ptr=ptr, wv_ptr=ptr, wh_ptr=ptr, bias_ptr=ptr, y_ptr=ptr),
            dict(common, HAS_BIAS=True, BLOCK_COLS=block_cols, BLOCK_J=block_j),
            lambda a: dict(BLOCK_ROWS=m._fwd_rows(a)),
        ),
        (
            "grad_input",
            m._sep_conv_bwd_input_kernel,
            dict(gy_ptr=ptr, wv_ptr=ptr, wh_ptr=ptr, gx_ptr=ptr),
            dict(common, BLOCK_COLS=m._bwd_input_columns(SHAPE["W"])),
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
    jobs = []
    for name, kernel, ptrs, extra, heuristics in kernels:
        configs = kernel.configs
        if not all_configs:  # the one with the largest tiles
            configs = [max(configs, key=lambda c: sorted(c.kwargs.values(), reverse=True))]
        for config in configs:
            constexprs = {**extra, **config.kwargs, **heuristics({**SHAPE, **extra, **config.kwargs})}
            jobs.append(Job("sep_conv", name, kernel, dtype, ptrs, constexprs, config.num_warps, config.num_stages))
    return jobs


def batched_svd_jobs(dtype: str, all_configs: bool) -> list[Job]:
    """One job per (BL, BK) tile the host wrapper can pick (powers of two, BK <= BL)."""
    m = batched_svd_kernels
    sizes = [(bl, bk) for bk in m.TILE_SIZES for bl in m.TILE_SIZES if m._MAX_K >= bk <= bl <= m._MAX_L]
    if not all_configs:
        sizes = [max(sizes)]
    ptr = f"*{dtype}"
    return [
        Job(
            "batched_svd",
            "jacobi",
            m._jacobi_kernel,
            dtype,
            dict(W_ptr=ptr, V_ptr=ptr, status_ptr="*i32"),
            dict(BL=bl, BK=bk),
            m._num_warps(bl, bk, torch.float64 if dtype == "fp64" else torch.float32),
            1,
            scalars=dict(tol2="fp32"),
        )
        for bl, bk in sizes
    ]


def householder_product_jobs(dtype: str, all_configs: bool) -> list[Job]:
    m = householder_product_kernels
    ptr = f"*{dtype}"
    blocks = dict(NB=m._NB, BLOCK_M=m._BLOCK_M, BLOCK_N=m._BLOCK_N)
    panels = [True, False] if all_configs else [True]
    jobs = [
        Job("householder_product", f"apply_panel(T^T={t})", m._apply_panel_kernel, dtype,
            dict(q_ptr=ptr, y_ptr=ptr, t_ptr=ptr), dict(blocks, TRANS_T=t), 4, 1)
        for t in panels
    ]  # fmt: skip
    all_ptrs = ("g_ptr", "x_ptr", "y_ptr", "v_ptr", "w_ptr", "t_ptr", "gsym_ptr", "ga_ptr")
    for name, kernel in (("project", m._project_kernel), ("grad_y", m._grad_y_kernel)):
        params = {p.name for p in _jit(kernel).params}
        jobs.append(
            Job("householder_product", name, kernel, dtype, {p: ptr for p in all_ptrs if p in params}, blocks, 4, 1)
        )
    return jobs


FAMILIES = {
    "sep_conv": (sep_conv_jobs, ["fp16", "bf16", "fp32", "fp64"]),
    "batched_svd": (batched_svd_jobs, ["fp32", "fp64"]),
    "householder_product": (householder_product_jobs, ["fp32", "fp64"]),
}

# What the test suite compiles: every kernel of each family once, on the configuration with the
# largest tiles, and the sep_conv forward in every 16-bit dtype on sm_80.
QUICK = [
    (90, "sep_conv", "fp16"),
    (80, "sep_conv", "bf16"),
    (90, "batched_svd", "fp64"),
    (90, "householder_product", "fp32"),
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


def launch_problems(arch: int, registers: int, threads: int, shared: int) -> list[str]:
    """Why a block with these resources cannot be resident on one SM of sm_<arch> (empty: it can)."""
    problems = []
    if registers * threads > REGISTER_FILE[arch]:
        problems.append(f"{registers} registers x {threads} threads exceed the {REGISTER_FILE[arch]}-register file")
    if shared > MAX_SHARED[arch]:
        problems.append(f"{shared} B of shared memory exceed the {MAX_SHARED[arch]} B per-block limit")
    return problems


def compile_job(job: Job, arch: int) -> tuple[str, list[str]]:
    """Compile one job for one architecture: (report line, reasons it cannot launch)."""
    fn = _jit(job.kernel)
    signature = {
        p.name: "constexpr" if p.is_constexpr else job.ptrs.get(p.name, job.scalars.get(p.name, "i32"))
        for p in fn.params
    }
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=job.constexprs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": job.num_warps, "num_stages": job.num_stages},
    )
    res = _resources(compiled.asm["cubin"])
    regs, stack, shared = res.get("REG", 0), res.get("STACK", 0), compiled.metadata.shared
    problems = launch_problems(arch, regs, 32 * job.num_warps, shared)
    line = f"sm_{arch} {job.label()}: registers {regs}, spill stack {stack} B, shared {shared} B"
    return line + (" -- CANNOT LAUNCH: " + "; ".join(problems) if problems else ""), problems


def run(selection: list[tuple[int, str, str]], all_configs: bool) -> int:
    failures = 0
    for arch, family, dtype in selection:
        make_jobs, _ = FAMILIES[family]
        for job in make_jobs(dtype, all_configs):
            line, problems = compile_job(job, arch)
            failures += bool(problems)
            print(line, flush=True)
    print(f"{failures} configuration(s) cannot launch" if failures else "every configuration can launch", flush=True)
    return 1 if failures else 0


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for real GPU targets")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every family, dtype, config, on sm_80 and sm_90")
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), help="with --all: only these families")
    args = parser.parse_args()
    if not args.all:
        return run(QUICK, all_configs=False)
    families = args.family or list(FAMILIES)
    selection = [(arch, f, d) for f in families for d in FAMILIES[f][1] for arch in (80, 90)]
    return run(selection, all_configs=True)


if __name__ == "__main__":
    sys.exit(main())
