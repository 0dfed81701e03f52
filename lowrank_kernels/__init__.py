"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for the contract of each op; DESIGN.md section 3 fixes the public names."""

from . import _C  # noqa: F401  (loads the C++ ops into torch.ops.lowrank)
from .batched_svd import batched_svd
from .sep_conv import sep_conv
from .svd_input import SVDInput

__all__ = ["sep_conv", "batched_svd", "SVDInput"]
__version__ = "0.1.0"
