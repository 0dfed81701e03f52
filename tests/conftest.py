import os

import torch

# Triton kernels run through the interpreter on machines without a GPU; must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
