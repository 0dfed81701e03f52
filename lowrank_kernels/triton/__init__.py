"""Triton implementations of the lowrank ops (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
is set before triton is imported). Attributes load lazily: importing this package never needs triton."""

import importlib

_LAZY = {"batched_svd": ".batched_svd"}


def __getattr__(name: str):
    if name in _LAZY:
        fn = getattr(importlib.import_module(_LAZY[name], __name__), name)
        # Importing the submodule bound its name on this package to the module; the public
        # name is the function of the same name (lk.triton.batched_svd(...)).
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
