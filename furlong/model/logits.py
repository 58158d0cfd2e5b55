"""Output-projection logits in float32 without rounding them to bf16 first.

A bf16 GEMM accumulates in float32 but rounds its output to bf16, which moves
log-probs of a 150k-token vocabulary by ~1e-2. `torch.mm(..., out_dtype=float32)`
keeps the float32 accumulator; the engine and the trainer both use it so that their
log-probs agree. Differentiable (the trainer backpropagates through it).
"""
from __future__ import annotations

import torch


class _Float32Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        grad = grad.to(hidden.dtype)
        return grad @ weight, grad.t() @ hidden


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls of `tensor` run in: the autocast dtype when autocast is on."""
    if tensor.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return tensor.dtype


def output_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, H) x (V, H) -> (N, V) float32. `weight` should already be in the compute dtype
    (cast it once per forward, not per chunk)."""
    dtype = compute_dtype(hidden)
    if hidden.is_cuda and dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", enabled=False):
            return _Float32Logits.apply(hidden.to(dtype), weight.to(dtype))
    return (hidden @ weight.t()).float()
