"""lowrank_kernels: fast low-rank convolutions, batched small SVDs and Householder products.

See README.md for an overview and docs/design.md for the contract of each op."""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

# _C loads the C++ ops into torch.ops.lowrank; each op family's module below adds its fake kernel,
# autograd and CUDA (Triton) kernel.
from . import _C, triton  # noqa: F401
from .batched_svd import batched_svd
from .compress import compress
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
    "householder_product",
    "SepConv2d",
    "LowRankLinear",
    "compress",
    "to_onnx",
    "OrthogonalConv2d",
    "orthogonality_loss",
    "orthonormality_loss",
    "SVDInput",
    "CPConv2d",
    "SeparableBasisConv2d",
    "Tucker2Conv2d",
    "vbmf_rank",
]
__version__ = "0.1.0"
