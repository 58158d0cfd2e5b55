"""Per-token loss terms and the reductions over a batch (SPEC.md section 3).

Tensors are flattened over the response tokens of a micro-batch, (N,), with
`sample_ids` (N,) naming each token's sample slot 0..S-1 and `mask` (N,) the 0/1 loss
mask. The per-token terms (policy loss, KL, entropy, SFT) are combined by the caller
and reduced once with `reduce_loss`, whose caller-supplied global denominator makes
the sum over micro-batches and ranks equal the loss of the whole global batch:

    per sample (default):   sum_samples mean_{t in sample, m_t = 1} x_t / num_global_samples
    per token:              sum_{t: m_t = 1} x_t / num_global_loss_tokens
"""
from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: keeps the ratio finite without changing real cases
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")


def log_ratio(log_probs: Tensor, old_log_probs: Tensor) -> Tensor:
    """`clamp(l - old, -20, 20)`, (N,)."""
    return (log_probs - old_log_probs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def sequence_mean(values: Tensor, mask: Tensor, sample_ids: Tensor, num_samples: int) -> Tensor:
    """Masked mean over each sample's tokens, given back to every token, (N,).

    `out_t = sum_{s in sample(t)} m_s x_s / max(sum_{s in sample(t)} m_s, 1)`;
    differentiable in `values`.
    """
    return _per_sample_means(values, mask, sample_ids, num_samples)[sample_ids]


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
    sequence_level: bool = False,
    mask: Tensor | None = None,
    sample_ids: Tensor | None = None,
    num_samples: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped policy-gradient loss per token (PPO/GRPO; GSPO with `sequence_level`).

    `rho = log_ratio(l, old)`, or under GSPO `sequence_mean(rho, mask, sample_ids,
    num_samples)` so every token of a sample shares one ratio (the gradient flows
    through the mean); `ratio = exp(rho)`;
    `L = max(-ratio * A, -clip(ratio, 1 - eps_clip, 1 + eps_clip_high) * A)`;
    with `eps_clip_c` and `A < 0`: `L = min(L, -eps_clip_c * A)` (dual clip).

    Returns `(L, clipped, approx_kl)`, each (N,): `clipped` is 1.0 where the clipped
    term is strictly larger than the unclipped one (before the dual clip), and
    `approx_kl = -rho` (`old - l`, the sequence mean under GSPO).
    """
    rho = log_ratio(log_probs, old_log_probs)
    if sequence_level:
        if mask is None or sample_ids is None or num_samples is None:
            raise ValueError(
                "policy_loss(sequence_level=True) needs mask, sample_ids and num_samples"
            )
        rho = sequence_mean(rho, mask, sample_ids, num_samples)
    ratio = rho.exp()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clip_won = (clipped > unclipped).to(log_probs.dtype)
    if eps_clip_c is not None:
        # Bounds the loss of a negative-advantage token whose ratio has run far above 1.
        dual_clipped = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, dual_clipped, loss)
    return loss, clip_won, -rho


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kind: str) -> Tensor:
    """KL estimator to the reference policy, (N,), with `d = l - ref`.

    k1 = `d`; k2 = `d^2 / 2`; k3 = `exp(-d) - 1 + d`; low_var_kl = k3 with `-d` clamped
    to [-20, 20] and the result clamped to [-10, 10].
    """
    d = log_probs - ref_log_probs
    if kind == "k1":
        return d
    if kind == "k2":
        return d**2 / 2
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    if kind == "low_var_kl":
        neg_d = (-d).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return (neg_d.exp() - 1 - neg_d).clamp(-10, 10)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {', '.join(KL_KINDS)}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Exact entropy over the full vocabulary, (N, V) -> (N,), in float32.

    `H = logsumexp(z) - sum_v softmax(z)_v * z_v`.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def tis_weights(
    old_log_probs: Tensor, rollout_log_probs: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Truncated importance-sampling weights, no gradient, (N,) each.

    `w = clip(exp(old - rollout), clip_low, clip_high)`; also returns the indicator
    (1.0 where the clip changed w).
    """
    with torch.no_grad():
        raw = (old_log_probs - rollout_log_probs).exp()
        weights = raw.clamp(clip_low, clip_high)
        return weights, (weights != raw).to(weights.dtype)


def sft_loss(log_probs: Tensor, mask: Tensor) -> Tensor:
    """Per-token negative log-likelihood `-m_t * l_t`, (N,).

    Reduce it with `reduce_loss` like every other term; the result is then
    `-mean(l_t)` over masked tokens (per token) or per sample then over samples.
    """
    return -log_probs * mask


def per_sample_mean_sum(
    values: Tensor, mask: Tensor, sample_ids: Tensor, num_samples: int
) -> Tensor:
    """`sum_s (sum_{t in s} m_t x_t / sum_{t in s} m_t)`, a scalar.

    Sums over the samples of this micro-batch of each sample's masked mean; a sample
    without masked tokens adds 0. The caller divides by the global number of samples.
    """
    return _per_sample_means(values, mask, sample_ids, num_samples).sum()


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """`sum_t m_t x_t`, a scalar; the caller divides by the global number of loss tokens."""
    return (values * mask).sum()


def reduce_loss(
    values: Tensor,
    mask: Tensor,
    sample_ids: Tensor,
    num_samples_in_microbatch: int,
    per_token: bool,
    global_denominator: float,
) -> Tensor:
    """This micro-batch's share of the global-batch mean, a scalar.

    per_token: `masked_sum(x, m) / global_denominator` (global number of loss tokens);
    otherwise `per_sample_mean_sum(x, m, ...) / global_denominator` (global number of
    samples). Summed over all micro-batches and ranks it is the same whatever the split.
    """
    if per_token:
        total = masked_sum(values, mask)
    else:
        total = per_sample_mean_sum(values, mask, sample_ids, num_samples_in_microbatch)
    return total / global_denominator


def _per_sample_means(values: Tensor, mask: Tensor, sample_ids: Tensor, num_samples: int) -> Tensor:
    """Masked mean of each sample's tokens, (S,); 0 for a sample without masked tokens."""
    sums = values.new_zeros(num_samples).index_add(0, sample_ids, values * mask)
    counts = values.new_zeros(num_samples).index_add(0, sample_ids, mask.to(values.dtype))
    return sums / counts.clamp(min=1)

