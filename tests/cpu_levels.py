"""The LOWRANK_CPU_CAPABILITY levels this machine can run, from /proc/cpuinfo by the rule the kernels'
dispatch applies (csrc/cpu_capability.h): avx2 needs AVX2 and FMA, avx512 also AVX-512 F, DQ, VL and BW.
Off x86-64 Linux only "default"."""

from __future__ import annotations

import platform
from pathlib import Path


def machine_levels() -> list[str]:
    levels = ["default"]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return levels
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return levels
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags:
            levels.append("avx512")
    return levels
