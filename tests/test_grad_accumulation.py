"""The float32 gradient accumulation kernel against torch's cast-and-add."""
from __future__ import annotations

import pytest
import torch

from furlong.train.grad_accumulation import accumulate

from conftest import run_check

CHECK = """
import torch
from furlong.train.grad_accumulation import accumulate

DEVICE = "cpu"
generator = torch.Generator().manual_seed(0)
for shape in ((5003,), (3, 7, 129), (0,)):  # not a multiple of the block; empty
    grads = [torch.randn(shape, generator=generator).to(DEVICE, torch.bfloat16)
             for _ in range(3)]
    first = grads[0].clone()
    total = accumulate(grads[0], grads[1])  # two bfloat16 gradients: a new float32 sum
    assert total.dtype == torch.float32 and total.shape == shape
    assert torch.equal(grads[0], first)  # the first micro-batch's tensor is not written
    same = accumulate(total, grads[2])  # later ones: into the float32 total
    assert same is total
    expected = grads[0].float() + grads[1].float() + grads[2].float()
    assert torch.equal(total, expected), (total - expected).abs().max()
print("accumulation ok")
"""


def _run(device: str, env: dict) -> None:
    run_check(CHECK.replace('DEVICE = "cpu"', f'DEVICE = "{device}"'), "accumulation ok", env)


def test_kernel_sums_in_float32_exactly_as_torch_in_the_interpreter():
    pytest.importorskip("triton")
    _run("cpu", {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_gpu_kernel_sums_in_float32_exactly_as_torch():
    _run("cuda", {})


def test_torch_path_for_strided_gradients():
    """A gradient that is not contiguous takes torch's ops (the kernel reads flat memory)."""
    total = torch.zeros(4, 3, dtype=torch.bfloat16)
    grad = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t()
    result = accumulate(total, grad)
    assert result.dtype == torch.float32 and torch.equal(result, grad.float())
