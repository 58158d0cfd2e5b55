"""Triton where it is installed, and whether furlong's Triton kernels run for a tensor.

The kernels (model/log_prob_head_kernels.py, train/grad_accumulation.py,
train/fused_adamw.py) run on CUDA tensors, and on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported: the tests); elsewhere their callers
take torch's path. Modules define their kernels under `if triton is not None:`.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without triton take torch's path
    triton = tl = None


def kernels_run(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors on `tensor`'s device."""
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
