"""The log-prob head's two passes over a chunk of float32 logits, as Triton kernels.

`chunk_stats` reads each row of logits z (C, V) once and keeps, per lane, an online
maximum m, s = sum exp(z - m) and t = sum exp(z - m) (z - m); the lanes then combine into

    lse = M + log S,   entropy = log S - T / S,   log_prob = z[target] - lse

(S, T the lane sums moved to the row maximum M; entropy = lse - sum_v p_v z_v, written
relative to M so that a peaked row's small entropy is not the difference of two large
numbers).
`logit_grad` is one elementwise pass from the logits to the head's dz (log_prob_head.py's
formula) in the model's dtype. Together they read the logits twice per chunk where
Inductor's kernels for the same functions read them four times, slowly: on an H200 they
took 15% of a Qwen3-30B-A3B-shaped training step (bench/RESULTS.md).

Runs where `triton_support.kernels_run` says (CUDA, or the CPU under the Triton
interpreter: the tests).
"""
from __future__ import annotations

import torch

from furlong.triton_support import tl, triton

BLOCK = 2048


if triton is not None:
    @triton.jit
    def _stats_kernel(logits, targets, lse_out, log_prob_out, entropy_out, vocab,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * vocab
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            z = tl.load(base + cols, mask=inside, other=0.0)
            m_new = tl.where(inside, tl.maximum(m, z), m)
            unseen = m == float("-inf")
            rescale = tl.where(unseen, 0.0, tl.exp(m - m_new))
            shift = tl.where(unseen, 0.0, m - m_new)
            weight = tl.where(inside, tl.exp(z - m_new), 0.0)
            t = rescale * (t + shift * s) + weight * tl.where(inside, z - m_new, 0.0)
            s = s * rescale + weight
            m = m_new
        row_max = tl.max(m, axis=0)
        unseen = m == float("-inf")
        lane_scale = tl.where(unseen, 0.0, tl.exp(m - row_max))
        lane_shift = tl.where(unseen, 0.0, m - row_max)
        total = tl.sum(s * lane_scale, axis=0)
        lse = row_max + tl.log(total)
        target_logit = tl.load(base + tl.load(targets + row))
        tl.store(lse_out + row, lse)
        tl.store(log_prob_out + row, target_logit - lse)
        shifted = tl.sum(lane_scale * (t + lane_shift * s), axis=0)  # sum e^(z-M) (z-M)
        tl.store(entropy_out + row, tl.log(total) - shifted / total)

    @triton.jit
    def _grad_kernel(logits, lse, entropy, targets, grad_log_probs, grad_entropy, out,
                     vocab, inv_temperature, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < vocab
        offsets = row.to(tl.int64) * vocab + cols
        log_p = tl.load(logits + offsets, mask=inside, other=0.0) - tl.load(lse + row)
        p = tl.exp(log_p)
        g = tl.load(grad_log_probs + row)
        e = tl.load(grad_entropy + row)
        onehot = (cols == tl.load(targets + row)).to(tl.float32)
        grad = g * onehot - g * p - e * p * (log_p + tl.load(entropy + row))
        tl.store(out + offsets, (grad * inv_temperature).to(out.dtype.element_ty),
                 mask=inside)


def chunk_stats(logits: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, log p(target), entropy), each (C,) float32, of contiguous logits (C, V)."""
    rows, vocab = logits.shape
    lse, log_probs, entropy = logits.new_empty(3, rows)
    if rows:
        _stats_kernel[(rows,)](logits, targets, lse, log_probs, entropy, vocab, BLOCK=BLOCK)
    return lse, log_probs, entropy


def logit_grad(logits: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
               targets: torch.Tensor, grad_log_probs: torch.Tensor,
               grad_entropy: torch.Tensor, inv_temperature: float,
               dtype: torch.dtype) -> torch.Tensor:
    """d loss / d(h @ W.T) (C, V) in `dtype` (log_prob_head's dz times 1/T)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, vocab, dtype=dtype, device=logits.device)
    if rows:
        _grad_kernel[(rows, triton.cdiv(vocab, BLOCK))](
            logits, lse, entropy, targets, grad_log_probs.float().contiguous(),
            grad_entropy.float().contiguous(), out, vocab, float(inv_temperature),
            BLOCK=BLOCK)
    return out
