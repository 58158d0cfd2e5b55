"""Micro-batch gradients summed in float32, one pass per parameter (Triton).

MasterWeights keeps the first micro-batch's bfloat16 gradient as autograd made it; each
later one is added in float32. torch does that as a cast (read 2 bytes, write 4 per
parameter) and a mixed-dtype add (read 6, write 4) that runs at about half the memory
bandwidth: on an MoE model, whose gradients cover every expert while a token uses a few,
it took 14% of a training step (bench/RESULTS.md). `accumulate` reads both gradients
and writes the float32 sum once: 8 bytes per parameter for the second micro-batch, 10
for later ones, at full bandwidth.

Runs on CUDA tensors, and on the CPU under the Triton interpreter (TRITON_INTERPRET=1,
the tests); torch's ops elsewhere.
"""
from __future__ import annotations

import torch

from furlong.triton_support import kernels_run, tl, triton

BLOCK = 4096


if triton is not None:
    @triton.jit
    def _sum_kernel(total, grad, out, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        value = tl.load(total + offsets, mask=inside).to(tl.float32) \
            + tl.load(grad + offsets, mask=inside).to(tl.float32)
        tl.store(out + offsets, value, mask=inside)


@torch.no_grad()
def accumulate(total: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """total + grad in float32: into `total` when it is float32 already, else into a new
    float32 tensor (the first sum of two bfloat16 gradients). Same shapes."""
    if not (kernels_run(total) and total.is_contiguous() and grad.is_contiguous()):
        return (total if total.dtype == torch.float32 else total.float()).add_(grad)
    out = total if total.dtype == torch.float32 else torch.empty_like(total, dtype=torch.float32)
    numel = total.numel()
    if numel:
        _sum_kernel[(triton.cdiv(numel, BLOCK),)](total, grad, out, numel, BLOCK=BLOCK)
    return out
