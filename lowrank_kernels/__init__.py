"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for the contract of each op; DESIGN.md section 3 fixes the public names."""

import torch  # noqa: F401  (loads libc10/libtorch, which the op library links against)

from ._ops_library import cmake_prefix_path, ops_library_path
from ._ops_library import load as _load_ops_library

# The op library (no Python inside) registers the C++ ops in torch.ops.lowrank;
# _cuda_registration adds the Triton CUDA kernels.
_load_ops_library()
from . import _cuda_registration, triton  # noqa: E402,F401
from .batched_svd import batched_svd
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
    "householder_product",
    "SepConv2d",
    "LowRankLinear",
    "compress",
    "to_onnx",
    "OrthogonalConv2d",
    "orthogonality_loss",
    "orthonormality_loss",
    "SVDInput",
    "ops_library_path",
    "cmake_prefix_path",
]
__version__ = "0.1.0"
