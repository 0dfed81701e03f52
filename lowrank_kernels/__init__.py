"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for the contract of each op; DESIGN.md section 3 fixes the public names."""

import torch  # noqa: F401  (loads libtorch, which _C links against, before _C)

from . import _C  # noqa: F401  (loads the C++ ops into torch.ops.lowrank)
from .sep_conv import sep_conv

__all__ = ["sep_conv"]
__version__ = "0.1.0"
