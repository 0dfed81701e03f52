"""Shared test set-up. Without CUDA, Triton kernels run in the interpreter on CPU tensors; that
switch is read when triton is first imported, so it is set here before any test module imports it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
