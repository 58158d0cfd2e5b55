"""The log-prob and entropy head: output projection, log p(target) and entropy, fused.

For hidden states h (N, H), the output weight W (V, H), targets t (N,) and temperature T:

    z = (h @ W.T) / T                     (float32 accumulator, furlong/model/logits.py)
    lse = logsumexp(z)
    log_prob = z[t] - lse
    entropy = lse - sum_v softmax(z)_v * z_v = -sum_v p_v log p_v

The (N, V) float32 logits are the largest tensors of a training step (150k-token
vocabularies), so they never exist whole: the forward walks the positions in chunks and
keeps only lse and the entropy per position; the backward recomputes each chunk's
logits and turns the upstream gradients (g for the log-probs, e for the entropy) into

    dz_v = g * (1[v = t] - p_v) - e * p_v * (log p_v + entropy)

then dh = dz @ W / T and dW = dz.T @ h / T. Peak extra memory is one chunk of logits
and its gradient; the GEMMs are those of an unfused head (one forward, one recomputed,
two backward). The elementwise work between them is two pure functions, run as Triton
kernels on a GPU (model/log_prob_head_kernels.py, one pass over the chunk each) and as
plain tensor code elsewhere. The backward accumulates dW of the chunks in float32, on a
GPU inside the GEMM (addmm into a float32 output).
"""
from __future__ import annotations

import torch

from furlong.model import log_prob_head_kernels as kernels
from furlong.model.logits import output_logits
from furlong.triton_support import kernels_run


def log_probs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, chunk_size: int = 1024
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), (N,) float32 each, differentiable in hidden and weight.
    `weight` should already be in the compute dtype of `hidden`."""
    inv_temperature = 1.0 / temperature if temperature > 0 else 1.0
    return _FusedHead.apply(hidden, weight, targets, inv_temperature, chunk_size)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor,
                   inv_temperature: float) -> torch.Tensor:
    logits = output_logits(hidden, weight)  # (C, V) float32
    return logits.mul_(inv_temperature) if inv_temperature != 1.0 else logits


def _forward_stats(logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, log p(target), entropy) of a chunk of logits z (C, V) float32, each (C,)."""
    lse = logits.logsumexp(dim=-1)
    log_p = logits - lse[:, None]
    log_probs = log_p.gather(-1, targets[:, None]).squeeze(-1)
    return lse, log_probs, -(log_p.exp() * log_p).sum(dim=-1)


def _logit_grad(logits: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                targets: torch.Tensor, grad_log_probs: torch.Tensor,
                grad_entropy: torch.Tensor, inv_temperature: float,
                dtype: torch.dtype) -> torch.Tensor:
    """d loss / d(h @ W.T) (C, V) in `dtype`: the module docstring's dz, times 1/T."""
    log_p = logits - lse[:, None]
    p = log_p.exp()
    onehot = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    g, e = grad_log_probs[:, None], grad_entropy[:, None]
    # g * onehot - g * p, not g * (onehot - p): autograd through gather and logsumexp
    # rounds this way, so runs reproduce those of the unfused head bit for bit.
    grad = g * onehot - g * p - e * p * (log_p + entropy[:, None])
    return (grad * inv_temperature).to(dtype)


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_z: torch.Tensor,
                            hidden: torch.Tensor) -> None:
    """grad_weight (V, H) float32 += grad_z.T @ hidden: on a GPU inside the GEMM (no
    float32 copy of the product and no separate add, each a pass over V x H)."""
    if grad_z.is_cuda and grad_z.dtype != torch.float32:
        torch.addmm(grad_weight, grad_z.t(), hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight += (grad_z.t() @ hidden).float()


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature: float, chunk_size: int):
        num_positions = hidden.shape[0]
        log_probs = hidden.new_empty(num_positions, dtype=torch.float32)
        entropy = hidden.new_empty(num_positions, dtype=torch.float32)
        lse = hidden.new_empty(num_positions, dtype=torch.float32)
        for start in range(0, num_positions, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _scaled_logits(hidden[rows], weight, inv_temperature)
            stats = kernels.chunk_stats if kernels_run(logits) else _forward_stats
            lse[rows], log_probs[rows], entropy[rows] = stats(logits, targets[rows])
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temperature, ctx.chunk_size = inv_temperature, chunk_size
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = _scaled_logits(hidden[rows], weight, ctx.inv_temperature)
            grad = kernels.logit_grad if kernels_run(logits) else _logit_grad
            grad_z = grad(logits, lse[rows], entropy[rows], targets[rows],
                          grad_log_probs[rows], grad_entropy[rows], ctx.inv_temperature,
                          hidden.dtype)
            del logits  # one chunk of float32 logits at a time
            if grad_hidden is not None:
                grad_hidden[rows] = grad_z @ weight
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_z, hidden[rows])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None
