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

then dh = dz @ W / T and dW = dz.T @ h / T. Peak extra memory is one chunk of logits;
the GEMMs are those of an unfused head (one forward, one recomputed, two backward).
"""
from __future__ import annotations

import torch

from furlong.model.logits import output_logits


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


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature: float, chunk_size: int):
        num_positions = hidden.shape[0]
        log_probs = hidden.new_empty(num_positions, dtype=torch.float32)
        entropy = hidden.new_empty(num_positions, dtype=torch.float32)
        lse = hidden.new_empty(num_positions, dtype=torch.float32)
        for start in range(0, num_positions, chunk_size):
            rows = slice(start, start + chunk_size)
            log_p = _scaled_logits(hidden[rows], weight, inv_temperature)
            lse[rows] = log_p.logsumexp(dim=-1)
            log_p.sub_(lse[rows, None])  # (C, V): log p
            log_probs[rows] = log_p.gather(-1, targets[rows, None]).squeeze(-1)
            entropy[rows] = -torch.linalg.vecdot(log_p.exp(), log_p)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temperature, ctx.chunk_size = inv_temperature, chunk_size
        ctx.set_materialize_grads(False)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        inv_temperature = ctx.inv_temperature
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            grad_z = _chunk_grad(_scaled_logits(hidden[rows], weight, inv_temperature),
                                 lse[rows], entropy[rows], targets[rows],
                                 None if grad_log_probs is None else grad_log_probs[rows],
                                 None if grad_entropy is None else grad_entropy[rows])
            if inv_temperature != 1.0:  # d/d(h @ W.T)
                grad_z.mul_(inv_temperature)
            grad_z = grad_z.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_z @ weight
            if grad_weight is not None:
                grad_weight += (grad_z.t() @ hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunk_grad(logits: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                targets: torch.Tensor, grad_log_probs: torch.Tensor | None,
                grad_entropy: torch.Tensor | None) -> torch.Tensor:
    """dz (C, V) float32 from the chunk's logits z (overwritten) and upstream gradients."""
    log_p = logits.sub_(lse[:, None])
    p = log_p.exp()
    if grad_entropy is not None:  # -e * p * (log p + entropy)
        grad_z = log_p.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
    else:
        grad_z = log_p.zero_()
    if grad_log_probs is not None:  # g * (onehot - p)
        grad_z.sub_(p.mul_(grad_log_probs[:, None]))
        grad_z.scatter_add_(-1, targets[:, None], grad_log_probs[:, None])
    return grad_z
