"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for the contract of each op; DESIGN.md section 3 fixes the public names."""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

# _C loads the C++ ops into torch.ops.lowrank; _cuda_registration adds the Triton CUDA kernels.
from . import _C, _cuda_registration, triton  # noqa: F401
from .batched_svd import batched_svd, cpu_capability
from .compress import compress
from .export import to_onnx
from .householder_product import householder_product
from .layers import LowRankLinear, SepConv2d
from .orthogonal import OrthogonalConv2d, orthogonality_loss, orthonormality_loss
from .sep_conv import sep_conv
from .svd_input import SVDInput

__all__ = [
    "sep_conv",
    "batched_svd",
    "cpu_capability",
    "householder_product",
    "SepConv2d",
    "LowRankLinear",
    "compress",
    "to_onnx",
    "OrthogonalConv2d",
    "orthogonality_loss",
    "orthonormality_loss",
    "SVDInput",
]
__version__ = "0.1.0"
