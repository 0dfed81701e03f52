"""Builds lowrank_kernels._C from every C++ file in csrc/ against the installed torch.

The default build is portable: no -march flag, so the library runs on any CPU of the
target architecture (any x86-64, aarch64, ...); kernels with hand-written SIMD are compiled
per instruction set in their own files and chosen at run time (LOWRANK_CPU_CAPABILITY
caps the choice). LOWRANK_CPU_ARCH=<value> adds -march=<value> for a build that only has
to run on one kind of CPU ("native": the build machine's; any value gcc accepts, e.g.
"x86-64-v3"); empty or "generic" means no -march flag.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _arch_flags() -> list[str]:
    arch = os.environ.get("LOWRANK_CPU_ARCH", "").strip()
    return [] if arch in ("", "generic") else [f"-march={arch}"]


setup(
    ext_modules=[
        CppExtension(
            "lowrank_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", *_arch_flags()],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
