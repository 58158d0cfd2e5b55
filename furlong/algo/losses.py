"""Per-token loss terms and the reductions over a batch (docs/algorithm.md).

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


def zero_inactive(values: Tensor, mask: Tensor) -> Tensor:
    """`m_t ? x_t : 0`, (N,), selected rather than multiplied.

    Applied to every per-token input before any arithmetic, so that a NaN or infinite
    value on a masked-out token (an unscored old log-prob, a reference log-prob of
    -inf) reaches neither the loss nor its gradient: `0 * NaN` is NaN, and a gradient
    through `exp(-inf)` is NaN even where a later `where` discards the value.
    """
    return torch.where(mask > 0, values, torch.zeros_like(values))


def clamp_log_ratio(log_ratio: Tensor) -> Tensor:
    """`clamp(x, -20, 20)`, (N,): applied to the log-ratio just before `exp`."""
    return log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


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

    `rho = l - old`, or under GSPO `sequence_mean(l - old, mask, sample_ids,
    num_samples)` so every token of a sample shares one ratio (the gradient flows
    through the mean); `ratio = exp(clamp_log_ratio(rho))`, the clamp after the mean
    as in Miles; `L = max(-ratio * A, -clip(ratio, 1 - eps_clip, 1 + eps_clip_high) * A)`;
    with `eps_clip_c` and `A < 0`: `L = min(L, -eps_clip_c * A)` (dual clip).

    Returns `(L, clipped, approx_kl)`, each (N,): `clipped` is 1.0 where the clipped
    term is strictly larger than the unclipped one (before the dual clip), and
    `approx_kl = -rho` (`old - l`, the sequence mean under GSPO), not clamped.
    """
    rho = log_probs - old_log_probs
    if sequence_level:
        if mask is None or sample_ids is None or num_samples is None:
            raise ValueError(
                "policy_loss(sequence_level=True) needs mask, sample_ids and num_samples"
            )
        rho = sequence_mean(rho, mask, sample_ids, num_samples)
    ratio = clamp_log_ratio(rho).exp()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clip_won = (clipped > unclipped).to(log_probs.dtype)
    if eps_clip_c is not None:
        # Bounds the loss of a negative-advantage token whose ratio has run far above 1.
        dual_clipped = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, dual_clipped, loss)
    return loss, clip_won, -rho


def ess_ratio(log_ratio: Tensor, mask: Tensor, sample_ids: Tensor, num_samples: int) -> Tensor:
    """Effective-sample-size ratio of each sample's importance weights, (S,), no gradient.

    With `w_t = exp(clamp_log_ratio(log_ratio_t))` (the ratio of `policy_loss`: pass
    its `-approx_kl`) and K = the sample's count of mask-1 tokens:
    `ess = (sum m w)^2 / (max(K, 1) * max(sum m w^2, 1e-8))`; 1 when every weight is
    equal, near 1/K when one token carries all the weight, 0 for a sample without
    mask-1 tokens.
    """
    with torch.no_grad():
        weights = zero_inactive(clamp_log_ratio(log_ratio).exp(), mask)
        zeros = weights.new_zeros(num_samples)
        total = zeros.index_add(0, sample_ids, weights)
        total_squared = zeros.index_add(0, sample_ids, weights * weights)
        count = zeros.index_add(0, sample_ids, mask.to(weights.dtype)).clamp(min=1)
        return total * total / (count * total_squared.clamp(min=1e-8))


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kind: str,
               importance_ratio: Tensor | None = None) -> Tensor:
    """KL estimator to the reference policy, (N,), with `d = l - ref`.

    k1 = `d`; k2 = `d^2 / 2`; k3 = `exp(-d) - 1 + d`; low_var_kl = k3 with `-d` clamped
    to [-20, 20] and the result clamped to [-10, 10]. `importance_ratio` (pi / pi_old,
    with its gradient: --use-unbiased-kl, DeepSeek-V3.2's estimate under off-policy
    samples) multiplies the estimate, before low_var_kl's clamp, as in Miles.
    """
    d = log_probs - ref_log_probs
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = d**2 / 2
    elif kind == "k3":
        kl = torch.exp(-d) - 1 + d
    elif kind == "low_var_kl":
        neg_d = (-d).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        kl = neg_d.exp() - 1 - neg_d
    else:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {', '.join(KL_KINDS)}")
    if importance_ratio is not None:
        kl = importance_ratio * kl
    return kl.clamp(-10, 10) if kind == "low_var_kl" else kl


def tis_weights(
    trainer_log_probs: Tensor, rollout_log_probs: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated importance-sampling weights, no gradient, (N,) each.

    `ratio = exp(trainer - rollout)` (not clamped, as Miles reports it);
    `w = clip(ratio, clip_low, clip_high)`. Returns `(w, ratio, clipped)`, `clipped`
    being 1.0 where the clip changed the ratio.
    """
    with torch.no_grad():
        ratio = (trainer_log_probs - rollout_log_probs).exp()
        weights = ratio.clamp(clip_low, clip_high)
        return weights, ratio, (weights != ratio).to(weights.dtype)


def opsm_keep(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor,
    sample_ids: Tensor, num_samples: int, delta: float,
) -> Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2; Miles' --use-opsm): (N,) 1.0 where a
    token keeps its policy loss, 0.0 where its advantage is negative and its sequence has
    drifted from the old policy by more than `delta`, the drift being the sequence's mean
    of old - current log-prob over its loss tokens. No gradient."""
    with torch.no_grad():
        drift = _per_sample_means(old_log_probs - log_probs, mask, sample_ids, num_samples)
        dropped = (advantages < 0) & (drift[sample_ids] > delta)
        return (~dropped).to(log_probs.dtype)


def sft_loss(log_probs: Tensor, mask: Tensor) -> Tensor:
    """Per-token negative log-likelihood `-l_t` on mask-1 tokens, 0 elsewhere, (N,).

    Reduce it with `reduce_loss` like every other term; the result is then
    `-mean(l_t)` over masked tokens (per token) or per sample then over samples.
    """
    return -zero_inactive(log_probs, mask)


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
    return zero_inactive(values, mask).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """`sum_t m_t x_t / max(sum_t m_t, 1)`, a scalar: the mean over the loss tokens given
    (the rollout/* per-token metrics; 0 when no token has mask 1)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


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
    sums = values.new_zeros(num_samples).index_add(0, sample_ids, zero_inactive(values, mask))
    counts = values.new_zeros(num_samples).index_add(0, sample_ids, mask.to(values.dtype))
    return sums / counts.clamp(min=1)

