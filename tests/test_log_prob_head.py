"""The fused log-prob/entropy head against the plain computation over whole logits."""
import math
import pytest
import torch

from furlong.model.log_prob_head import log_probs_and_entropy

from conftest import run_check


def plain_head(hidden, weight, targets, temperature):
    """Whole (N, V) logits in float64: log-softmax at the targets and the entropy."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    log_p = logits.log_softmax(dim=-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("num_positions,chunk_size,temperature",
                         [(13, 4, 1.0), (13, 32, 0.7), (8, 8, 1.3), (0, 4, 1.0)])
def test_fused_head_matches_whole_logits_values_and_gradients(num_positions, chunk_size,
                                                               temperature):
    generator = torch.Generator().manual_seed(num_positions + chunk_size)
    hidden = torch.randn(num_positions, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (num_positions,), generator=generator)
    grad_log_probs = torch.randn(num_positions, generator=generator)
    grad_entropy = torch.randn(num_positions, generator=generator)

    log_probs, entropy = log_probs_and_entropy(hidden, weight, targets, temperature, chunk_size)
    (log_probs * grad_log_probs + entropy * grad_entropy).sum().backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected_log_probs, expected_entropy = plain_head(hidden, weight, targets, temperature)
    (expected_log_probs * grad_log_probs + expected_entropy * grad_entropy).sum().backward()

    assert log_probs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(log_probs.double(), expected_log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grads[0], hidden.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_grads[1], weight.grad, atol=1e-4, rtol=1e-4)


def test_fused_head_with_only_log_probs_in_the_loss():
    """The entropy's gradient is absent (entropy only logged): the log-prob gradient alone."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 8, generator=generator, requires_grad=True)
    weight = torch.randn(30, 8, generator=generator)
    targets = torch.randint(0, 30, (9,), generator=generator)
    log_probs, _ = log_probs_and_entropy(hidden, weight, targets, 1.0, 4)
    log_probs.sum().backward()
    fused = hidden.grad.clone()
    hidden.grad = None
    plain_head(hidden, weight, targets, 1.0)[0].sum().backward()
    torch.testing.assert_close(fused, hidden.grad.float(), atol=1e-5, rtol=1e-5)


def test_uniform_logits_have_the_log_of_the_vocabulary_as_entropy():
    log_probs, entropy = log_probs_and_entropy(torch.ones(3, 4), torch.zeros(7, 4),
                                               torch.tensor([0, 3, 6]))
    torch.testing.assert_close(entropy, torch.full((3,), math.log(7)))
    torch.testing.assert_close(log_probs, torch.full((3,), -math.log(7)))


KERNEL_CHECK = """
import torch
from furlong.model import log_prob_head, log_prob_head_kernels as kernels
from furlong.triton_support import kernels_run

DEVICE = "cpu"
generator = torch.Generator().manual_seed(3)
for rows, vocab in ((37, 5003), (3, 700), (0, 64)):  # vocab not a multiple of the block
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    grad_log_probs, grad_entropy = torch.randn(2, rows, generator=generator).to(DEVICE)
    assert kernels_run(logits)
    eager = log_prob_head._forward_stats(logits, targets)
    for got, expected in zip(kernels.chunk_stats(logits, targets), eager, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if rows:  # a peaked row (entropy ~1e-4, logits ~40): relative accuracy, not absolute
        peaked = logits.clone()
        peaked[0] = logits[0] / 3 - 10
        peaked[0, 7] = 40.0
        exact = log_prob_head._forward_stats(peaked.double(), targets)[2][0]
        entropy = kernels.chunk_stats(peaked, targets)[2][0]
        assert abs(float(entropy) / float(exact) - 1) < 1e-3, (float(entropy), float(exact))
    lse, _, entropy = eager
    for dtype in (torch.float32, torch.bfloat16):
        args = (logits, lse, entropy, targets, grad_log_probs, grad_entropy, 0.8, dtype)
        got, expected = kernels.logit_grad(*args), log_prob_head._logit_grad(*args)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-6,
                                   rtol=1e-5 if dtype == torch.float32 else 2 ** -7)
print("head kernels ok")
"""


def _run_kernel_check(device: str, env: dict) -> None:
    run_check(KERNEL_CHECK.replace('DEVICE = "cpu"', f'DEVICE = "{device}"'), "head kernels ok",
              env)


def test_triton_kernels_equal_the_torch_functions_in_the_interpreter():
    """The GPU's two kernels (stats of a chunk, its logit gradient) give what the plain
    functions give, on rows of any length, in float32 and bfloat16."""
    pytest.importorskip("triton")
    _run_kernel_check("cpu", {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_gpu_triton_kernels_equal_the_torch_functions():
    _run_kernel_check("cuda", {})


@pytest.mark.gpu
def test_gpu_fused_head_matches_whole_logits_in_bfloat16():
    """The whole head on a GPU in bf16 (kernels, float32 dW accumulated in the GEMM)
    against float64 whole logits of the same bf16 inputs."""
    generator = torch.Generator().manual_seed(5)
    hidden = (torch.randn(300, 64, generator=generator)).to("cuda", torch.bfloat16)
    weight = (torch.randn(5000, 64, generator=generator) * 0.2).to("cuda", torch.bfloat16)
    targets = torch.randint(0, 5000, (300,), generator=generator).cuda()
    upstream = torch.randn(2, 300, generator=generator).cuda()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    log_probs, entropy = log_probs_and_entropy(hidden, weight, targets, 0.9, 128)
    (log_probs * upstream[0] + entropy * upstream[1]).sum().backward()
    fused = hidden.grad.float(), weight.grad.float()
    hidden.grad = weight.grad = None
    expected = plain_head(hidden, weight, targets, 0.9)
    (expected[0] * upstream[0] + expected[1] * upstream[1]).sum().backward()
    torch.testing.assert_close(log_probs.double(), expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy.double(), expected[1], atol=1e-4, rtol=1e-4)
    for got, want in zip(fused, (hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=2e-2)
