"""Advantage estimators (SPEC.md section 3): GRPO/GSPO, REINFORCE++, REINFORCE++-baseline.

Samples are ordered group-major: slot s = g * n + i is response i of prompt group g.
Per-token quantities are flattened over the response tokens of a batch, (N,), with
`sample_ids` (N,) naming each token's slot and `mask` (N,) the 0/1 loss mask; a
sample's tokens are contiguous.

REINFORCE++ and REINFORCE++-baseline must be followed by `whiten` over the whole batch
(`--normalize-advantages`); GRPO and GSPO use the group-normalised scalar as is.
"""
from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantage of each response, (G, n) -> (G, n).

    `A = r - mean_group(r)`, then `A / (std_group(r) + eps)` with the unbiased std
    (correction 1) when `normalize_std` and n > 1. A group with one response or with
    equal rewards gets 0. GSPO uses the same advantage (`gspo_advantages`).
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (G, n)
    if not normalize_std or rewards.shape[1] == 1:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


gspo_advantages = grpo_advantages


def broadcast_to_tokens(per_sample: Tensor, sample_ids: Tensor) -> Tensor:
    """Give every token its sample's value: `out_t = per_sample[sample_ids_t]`, (S,) -> (N,)."""
    return per_sample[sample_ids]


def reinforce_plus_plus_token_rewards(
    scalar_rewards: Tensor, kl: Tensor, sample_ids: Tensor, mask: Tensor, kl_coef: float
) -> Tensor:
    """REINFORCE++ token rewards, (N,).

    `r_t = -kl_coef * kl_t` on every token, plus the sample's scalar reward
    (`scalar_rewards`, (S,)) at its last token with mask 1; a sample with no such token
    gets it at its last token.
    """
    num_samples = scalar_rewards.shape[0]
    index = torch.arange(sample_ids.shape[0], device=sample_ids.device)  # (N,)
    unset = torch.full((num_samples,), -1, dtype=index.dtype, device=index.device)
    last_token = unset.scatter_reduce(0, sample_ids, index, "amax")  # (S,), -1 if no token
    last_in_mask = unset.scatter_reduce(0, sample_ids, torch.where(mask > 0, index, -1), "amax")
    last = torch.where(last_in_mask >= 0, last_in_mask, last_token)
    has_tokens = last >= 0
    token_rewards = -kl_coef * kl
    return token_rewards.index_add(0, last[has_tokens], scalar_rewards[has_tokens].to(kl.dtype))


def reinforce_plus_plus_returns(
    token_rewards: Tensor, sample_ids: Tensor, mask: Tensor, gamma: float
) -> Tensor:
    """Discounted return to the end of each sample, (N,).

    `A_t = sum_{s >= t, s in sample(t)} gamma^(s - t) * m_s * r_s`: a masked-out token
    adds nothing to the sums but still gets a return (the loss mask drops it later).
    """
    rewards = token_rewards * mask
    positions = _positions_in_sample(sample_ids)  # (N,)
    num_samples, max_length = int(sample_ids.max()) + 1, int(positions.max()) + 1
    # (S, T), zero-padded after each sample's end so the padding adds nothing.
    padded = rewards.new_zeros(num_samples, max_length)
    padded[sample_ids, positions] = rewards
    if gamma == 1.0:
        returns = padded.flip(1).cumsum(1).flip(1)
    else:
        returns = torch.empty_like(padded)
        running = padded.new_zeros(num_samples)  # (S,)
        for t in reversed(range(max_length)):
            running = padded[:, t] + gamma * running
            returns[:, t] = running
    return returns[sample_ids, positions]


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Masked whitening over all tokens given, (N,): `(A - mean) / sqrt(var + eps)`.

    `mean` and `var` (population variance, mean of squared deviations) are over tokens
    with mask 1. Every token is whitened with these statistics, masked-out ones
    included (as in Miles and verl); the loss mask discards those later. An all-zero
    mask gives mean 0 and var 0 rather than NaN.
    """
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = ((values - mean) ** 2 * mask).sum() / count
    return (values - mean) * torch.rsqrt(var + eps)


def _positions_in_sample(sample_ids: Tensor) -> Tensor:
    """Index of each token within its sample, (N,): 0 at the first token of each sample."""
    index = torch.arange(sample_ids.shape[0], device=sample_ids.device)
    is_first = torch.ones_like(sample_ids, dtype=torch.bool)
    is_first[1:] = sample_ids[1:] != sample_ids[:-1]
    first_index = torch.where(is_first, index, 0).cummax(dim=0).values
    return index - first_index
