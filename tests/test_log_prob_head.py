"""The fused log-prob/entropy head against the plain computation over whole logits."""
import math

import pytest
import torch

from furlong.model import log_prob_head
from furlong.model.log_prob_head import log_probs_and_entropy


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


@pytest.mark.gpu
def test_compiled_gpu_kernels_equal_the_same_functions_run_eagerly():
    """On a GPU the head's elementwise functions run compiled (torch.compile); on ragged
    chunk shapes they give what the same functions give eagerly."""
    generator = torch.Generator().manual_seed(3)
    for rows in (300, 44):
        logits = (torch.randn(rows, 5000, generator=generator) * 3).cuda()
        targets = torch.randint(0, 5000, (rows,), generator=generator).cuda()
        grad_log_probs, grad_entropy = torch.randn(2, rows, generator=generator).cuda()
        eager = log_prob_head._forward_stats(logits, targets)
        compiled = log_prob_head._compiled(log_prob_head._forward_stats)(logits, targets)
        for got, expected in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        lse, _, entropy = eager
        args = (logits, lse, entropy, targets, grad_log_probs, grad_entropy, 0.8, torch.float32)
        torch.testing.assert_close(log_prob_head._compiled(log_prob_head._logit_grad)(*args),
                                   log_prob_head._logit_grad(*args), atol=1e-6, rtol=1e-5)
