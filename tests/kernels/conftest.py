"""Kernel tests run on a GPU when there is one, else on CPU tensors under the Triton
interpreter, which must be switched on before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
