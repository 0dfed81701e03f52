"""Run-time instruction-set dispatch of the CPU SIMD kernels (LOWRANK_CPU_CAPABILITY).

The batched SVD's kernels are compiled once per level (default, avx2, avx512) and chosen when
the first kernel runs, so each level is exercised in its own subprocess with the environment
variable set. Every level this machine supports runs the same inputs, and each result is
checked against float64 LAPACK with tolerances from the dtype's epsilon, the matrix size and
the spectral gap of the input. (householder_product has no hand-written SIMD: nothing to
dispatch.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpu_levels import machine_levels

from lowrank_kernels._reference import batched_svd_reference

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("default", "avx2", "avx512")

# (batch, m, n), dtype: float lanes (float32 <= 8 x 8), the Gram route (float32 beyond), Jacobi in
# double lanes (float64), wide and tall, batches that leave padding lanes at every width (16 floats
# or 8 doubles per AVX-512 vector), and one size on the LAPACK fallback.
CASES = [
    ((37, 8, 8), "float32"),
    ((21, 3, 7), "float32"),
    ((19, 16, 16), "float32"),
    ((11, 24, 20), "float32"),
    ((5, 9, 40), "float32"),
    ((3, 64, 64), "float32"),
    ((19, 8, 8), "float64"),
    ((13, 16, 16), "float64"),
    ((7, 30, 12), "float64"),
    ((2, 70, 66), "float64"),
]

# Runs in the subprocess: the level in effect and, per case, the inputs and results.
_CHILD = r"""
import json, sys, torch, lowrank_kernels as lk
cases = json.loads(sys.argv[1])
out = {"capability": lk.cpu_capability(), "results": []}
for (shape, dtype), seed in zip(cases, range(len(cases))):
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    # A = P diag(s) Q^T with s evenly spread over [1, 2]: a known spectral gap of 1 / (k - 1).
    P = torch.linalg.qr(torch.randn(*batch, m, k, dtype=torch.float64, generator=g))[0]
    Q = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=g))[0]
    s = torch.linspace(2.0, 1.0, k, dtype=torch.float64)
    A = ((P * s) @ Q.mT).to(getattr(torch, dtype))
    A[0, 0, 0] = float("nan")  # a non-finite matrix: all its outputs are NaN at every level
    U, S, Vh = lk.batched_svd(A)
    out["results"].append({k: v.tolist() for k, v in dict(A=A, U=U, S=S, Vh=Vh).items()})
json.dump(out, sys.stdout)
"""


def _run(code: str, capability: str | None, *args: str, wide: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LOWRANK_CPU_CAPABILITY", None)
    env.pop("LOWRANK_SVD_AVX512_WIDE", None)
    if wide:
        env["LOWRANK_SVD_AVX512_WIDE"] = "1"
    if capability is not None:
        env["LOWRANK_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _machine_level() -> str:
    proc = _run("import lowrank_kernels as lk; print(lk.cpu_capability())", None)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


MACHINE_LEVEL = _machine_level()
SUPPORTED = LEVELS[: LEVELS.index(MACHINE_LEVEL) + 1]


def test_machine_level_is_the_best_the_cpu_supports():
    assert MACHINE_LEVEL == machine_levels()[-1]


# At the avx512 level the float32 Gram route runs at 4-double lanes; LOWRANK_SVD_AVX512_WIDE=1
# runs it at 8 as well, so that every compiled kernel is checked.
VARIANTS = [(level, False) for level in SUPPORTED] + ([("avx512", True)] if "avx512" in SUPPORTED else [])


@pytest.mark.parametrize("level,wide", VARIANTS)
def test_batched_svd_at_every_supported_level(level, wide):
    proc = _run(_CHILD, level, json.dumps(CASES), wide=wide)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["capability"] == level
    for ((batch, m, n), dtype_name), res in zip(CASES, out["results"]):
        dtype = getattr(torch, dtype_name)
        A, U, S, Vh = (torch.tensor(res[key], dtype=dtype) for key in ("A", "U", "S", "Vh"))
        k = min(m, n)
        assert U.shape == (batch, m, k) and S.shape == (batch, k) and Vh.shape == (batch, k, n)
        assert U[0].isnan().all() and S[0].isnan().all() and Vh[0].isnan().all()
        A, U, S, Vh = A[1:].double(), U[1:].double(), S[1:].double(), Vh[1:].double()
        Ur, Sr, Vhr = batched_svd_reference(A)
        eps = torch.finfo(dtype).eps
        # Backward-stable SVD: singular values to ~ eps * size * ||A|| (||A||_2 = 2 here); the
        # singular vectors additionally amplified by ||A|| / gap, with gap = 1 / (k - 1).
        tol_s = 10 * eps * max(m, n) * 2.0
        tol_v = tol_s * max(k - 1, 1)
        assert (S - Sr).abs().max().item() <= tol_s, (level, m, n, dtype_name)
        sign = torch.sign((U * Ur).sum(-2, keepdim=True))
        assert (U - sign * Ur).abs().max().item() <= tol_v, (level, m, n, dtype_name)
        assert (Vh - sign.mT * Vhr).abs().max().item() <= tol_v, (level, m, n, dtype_name)
        eye = torch.eye(k, dtype=torch.float64)
        assert (U.mT @ U - eye).abs().max().item() <= tol_s
        assert (Vh @ Vh.mT - eye).abs().max().item() <= tol_s


def test_override_is_honored_and_case_insensitive():
    for level in SUPPORTED:
        proc = _run("import lowrank_kernels as lk; print(lk.cpu_capability())", level.upper())
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == level


def test_unknown_value_is_a_clear_error():
    code = (
        "import torch, lowrank_kernels as lk\n"
        "try:\n"
        "    lk.batched_svd(torch.randn(2, 4, 4))\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    proc = _run(code, "sse9")
    assert proc.returncode == 0, proc.stderr
    assert "ValueError:" in proc.stdout
    assert "LOWRANK_CPU_CAPABILITY" in proc.stdout and "sse9" in proc.stdout and "avx512" in proc.stdout


def test_level_above_the_cpu_falls_back_with_a_warning():
    above = [lv for lv in LEVELS if LEVELS.index(lv) > LEVELS.index(MACHINE_LEVEL)]
    if not above:
        pytest.skip(f"this CPU supports the highest level ({MACHINE_LEVEL}): nothing above it to ask for")
    code = (
        "import warnings, lowrank_kernels as lk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(lk.cpu_capability())\n"
        "print(any('LOWRANK_CPU_CAPABILITY' in str(x.message) for x in w))\n"
    )
    proc = _run(code, above[-1])
    assert proc.returncode == 0, proc.stderr
    level, warned = proc.stdout.strip().splitlines()[-2:]
    assert level == MACHINE_LEVEL and warned == "True"
