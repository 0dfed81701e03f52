"""Every Triton kernel family compiles for sm_80 / sm_90 without a GPU and each configuration can
launch (tests/triton_compile_check.py; `python tests/triton_compile_check.py --all` is the full sweep).
This catches what the interpreter does not check: dot shapes and dtypes, tl.gather lowering, layouts,
register and shared-memory limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).with_name("triton_compile_check.py")


def _run_check(*args: str) -> subprocess.CompletedProcess:
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_every_kernel_family_compiles_and_can_launch():
    run = _run_check()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "every configuration can launch"
    for family in ("sep_conv/forward", "sep_conv/grad_input", "sep_conv/grad_weight_h", "sep_conv/grad_weight_v"):
        assert any(family in line for line in lines), family
    for family in ("batched_svd/jacobi", "householder_product/apply_panel", "householder_product/project"):
        assert any(family in line for line in lines), family
    assert all("registers" in line and "shared" in line for line in lines[:-1])


def test_launch_limits_are_enforced():
    # A configuration over the register file or the shared-memory limit is reported, not passed.
    pytest.importorskip("triton")
    sys.path.insert(0, str(CHECK.parent))
    import triton_compile_check as check

    assert check.launch_problems(90, 128, 512, 64 * 1024) == []
    assert check.launch_problems(90, 255, 256, 0) == []  # 65280 registers: fits
    assert "register file" in check.launch_problems(90, 255, 512, 0)[0]
    assert "shared memory" in check.launch_problems(80, 64, 128, 200 * 1024)[0]  # fits sm_90, not sm_80
    assert check.launch_problems(90, 64, 128, 200 * 1024) == []
