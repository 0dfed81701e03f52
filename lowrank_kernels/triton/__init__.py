"""Triton implementations (the CUDA path), callable directly on CUDA tensors, or on CPU tensors
when TRITON_INTERPRET=1 is set before triton is imported.

Kernel modules are imported on first attribute access, so importing lowrank_kernels works
without triton. Reach the functions through this package (lowrank_kernels.triton.<name>):
after a kernel module loads, its exported functions replace the submodule attributes of the
same name."""

from __future__ import annotations

import importlib

# public function -> kernel module in this package
_FUNCTIONS = {
    "householder_product": "householder_product",
    "householder_product_backward": "householder_product",
}

__all__ = sorted(_FUNCTIONS)


def __getattr__(name: str):
    module_name = _FUNCTIONS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    for exported in module.__all__:
        globals()[exported] = getattr(module, exported)
    return globals()[name]
