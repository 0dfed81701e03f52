"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for an overview and docs/design.md for the contract of each op."""

import torch  # noqa: F401  (loads libc10/libtorch, which the op library links against)

# Importing _ops_library loads the op library (no Python inside), which defines the ops in
# torch.ops.lowrank with their C++ kernels; it must come first: each op family's module below then
# adds its fake kernel, autograd and CUDA (Triton) kernel to those ops.
from ._ops_library import cmake_prefix_path, ops_library_path

# isort: split
from . import triton  # noqa: F401
from .batched_svd import batched_svd, cpu_capability
from .compress import compress
from .deploy import export_aoti, load_aoti
from .export import to_onnx
from .householder_product import householder_product
from .layers import LowRankLinear, SepConv2d
from .orthogonal import OrthogonalConv2d, orthogonality_loss, orthonormality_loss
from .schemes import CPConv2d, SeparableBasisConv2d, Tucker2Conv2d, vbmf_rank
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
    "export_aoti",
    "load_aoti",
    "ops_library_path",
    "cmake_prefix_path",
    "CPConv2d",
    "SeparableBasisConv2d",
    "Tucker2Conv2d",
    "vbmf_rank",
]
__version__ = "0.1.0"
