"""Builds lowrank_kernels._C from every C++ file in csrc/ against the installed torch.

LOWRANK_CPU_ARCH picks the instruction set: "native" (default, the build machine's CPU),
any value gcc accepts for -march (e.g. "x86-64-v3" for AVX2+FMA, "x86-64-v2" for CPUs
without AVX2), or "generic" for no -march flag at all. Kernels keep a scalar path for
CPUs without AVX2/FMA.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _arch_flags() -> list[str]:
    arch = os.environ.get("LOWRANK_CPU_ARCH", "native")
    return [] if arch == "generic" else [f"-march={arch}"]


setup(
    ext_modules=[
        CppExtension(
            "lowrank_kernels._C",
            sorted(glob.glob("csrc/**/*.cpp", recursive=True)),
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", *_arch_flags()],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
