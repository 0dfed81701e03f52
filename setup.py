"""Builds the op library lowrank_kernels/lib/liblowrank_ops.so from every C++ file in csrc/ against
the installed torch.

The library holds the `lowrank` ops, their CPU kernels and registrations, and needs no Python: it
links only libc10/libtorch/libtorch_cpu, so the same file serves `torch.ops.load_library` in Python
and a C++ program (AOTInductor, libtorch) that finds it with `find_package(LowrankKernels)`.

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


class _BuildOpsLibrary(BuildExtension.with_options(use_ninja=True, no_python_abi_suffix=True)):
    def copy_extensions_to_source(self):
        # In-place builds copy the library into lowrank_kernels/lib/, which git does not track.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            os.makedirs(os.path.dirname(self._get_inplace_equivalent(build_py, ext)[0]), exist_ok=True)
        super().copy_extensions_to_source()


# py_limited_api=True keeps libtorch_python (and so Python) off the link line; the library has no
# module init function, so it is loaded with torch.ops.load_library, never imported.
# no_python_abi_suffix drops ".abi3" from the file name: a plain liblowrank_ops.so.
# The soname lets a C++ program link it by name; the rpath finds torch's libraries when the package
# sits next to torch in site-packages (lowrank_kernels/lib/ -> torch/lib/).
setup(
    ext_modules=[
        CppExtension(
            "lowrank_kernels.lib.liblowrank_ops",
            sorted(glob.glob("csrc/**/*.cpp", recursive=True)),
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", *_arch_flags()],
            extra_link_args=["-fopenmp", "-Wl,-soname,liblowrank_ops.so", "-Wl,-rpath,$ORIGIN/../../torch/lib"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": _BuildOpsLibrary},
)
