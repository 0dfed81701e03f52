"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for the contract of each op; DESIGN.md section 3 fixes the public names."""

import torch  # noqa: F401  (loads libc10/libtorch before the extension needs them)

from . import (
    _C,  # noqa: F401  (loads the C++ ops into torch.ops.lowrank)
    triton,  # noqa: F401  (lazy: imports the triton package only on first use)
)
from .householder_product import householder_product
from .orthogonal import OrthogonalConv2d, orthogonality_loss, orthonormality_loss
from .sep_conv import sep_conv

__all__ = ["sep_conv", "householder_product", "OrthogonalConv2d", "orthogonality_loss", "orthonormality_loss"]
__version__ = "0.1.0"
