"""The op library: `lowrank_kernels/lib/liblowrank_ops.so` holds the `lowrank` ops, their CPU
kernels and registrations, and needs no Python. Python loads it with `torch.ops.load_library`; a C++
program links it (CMake: `find_package(LowrankKernels)` with `cmake_prefix_path`) or dlopens it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
_LIBRARY_NAME = {"win32": "lowrank_ops.dll", "darwin": "liblowrank_ops.dylib"}.get(sys.platform, "liblowrank_ops.so")

# Directory to add to CMAKE_PREFIX_PATH (next to torch.utils.cmake_prefix_path) so that
# find_package(LowrankKernels) finds LowrankKernelsConfig.cmake and the imported target
# LowrankKernels::lowrank_ops.
cmake_prefix_path = str(_PACKAGE_DIR / "share" / "cmake")


def ops_library_path() -> str:
    """Absolute path of the op library (`liblowrank_ops.so`) inside the installed package."""
    return str(_PACKAGE_DIR / "lib" / _LIBRARY_NAME)


def load() -> None:
    """Load the op library into this process (registers `torch.ops.lowrank.*`); loading twice is a no-op."""
    path = Path(ops_library_path())
    if not path.is_file():
        raise ImportError(
            f"lowrank_kernels: the op library {path} is missing. Build it against the installed torch with "
            "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` in the source tree."
        )
    torch.ops.load_library(str(path))


load()
