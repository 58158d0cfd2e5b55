"""Advantage estimators (docs/algorithm.md): GRPO/GSPO, REINFORCE++, REINFORCE++-baseline.

A rollout batch holds S samples in slots 0..S-1, each with a group id (its prompt's
`Sample.group_index`, `group_ids` (S,)); a group's samples need not be adjacent, and
groups may differ in size (a custom generate function may return several samples per
prompt). Functions of whole groups (`zero_std_groups`, `grpo_advantages`) take them as
rows of an equal-sized (G, n) tensor; `grpo_advantages_by_group_id` applies them to the
(S,) rewards of a batch. Per-token quantities are flattened over the response tokens of
a batch, (N,), with `sample_ids` (N,) naming each token's slot and `mask` (N,) the 0/1
loss mask; a sample's tokens are contiguous.

REINFORCE++ and REINFORCE++-baseline must be followed by `whiten` over the whole batch
(`--normalize-advantages`); GRPO and GSPO use the group-normalised scalar as is.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from furlong.algo.losses import kl_penalty

ZERO_STD_TOLERANCE = 1e-8  # Miles' dynamic-sampling threshold on the float64 std


def zero_std_groups(rewards: Tensor) -> Tensor:
    """Which groups count as having equal rewards, (G, n) -> (G,) bool.

    `not std64(r) > 1e-8`, with the unbiased std (correction 1) computed in float64, as
    Miles' `check_reward_nonzero_std` decides; a group of one response (std undefined)
    counts as equal. The zero-std filter, `rollout/zero_std/count` and the zero advantage
    of `grpo_advantages` all use this one rule.
    """
    if rewards.shape[1] < 2:
        return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    return ~(rewards.double().std(dim=1) > ZERO_STD_TOLERANCE)


def has_zero_std(rewards: Sequence[float]) -> bool:
    """`zero_std_groups` for the rewards of one group, given as Python numbers."""
    return bool(zero_std_groups(torch.tensor([list(rewards)], dtype=torch.float64))[0])


def grpo_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantage of each response, (G, n) -> (G, n), in the rewards' dtype.

    `A = r - mean_group(r)`, then `A / (std_group(r) + eps)` with the unbiased std
    (correction 1) when `normalize_std`; computed in float64. A group that
    `zero_std_groups` calls equal (one response included) gets exactly 0: rounding
    noise in the mean of equal float32 rewards would otherwise be divided by a std near
    0 and push every sample of the group the same way (Miles gives eight rewards of 0.7
    an advantage of +0.056 each). GSPO uses this same advantage.
    """
    r = rewards.double()
    centered = r - r.mean(dim=1, keepdim=True)  # (G, n)
    if normalize_std and r.shape[1] > 1:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    equal = zero_std_groups(rewards)[:, None]  # (G, 1)
    return torch.where(equal, torch.zeros_like(centered), centered).to(rewards.dtype)


def grpo_advantages_by_group_id(rewards: Tensor, group_ids: Tensor, normalize_std: bool = True,
                                eps: float = 1e-6) -> Tensor:
    """`grpo_advantages` of a batch whose groups are named by id, (S,) -> (S,).

    For sample i of group g = group_ids_i (the samples of g: those with that id, in any
    slots, any number of them): `A_i = r_i - mean_g(r)`, divided by `std_g(r) + eps`
    (unbiased) when `normalize_std`, in float64, and exactly 0 when `zero_std_groups`
    calls the group's rewards equal (a group of one included). In the rewards' dtype.
    """
    group_ids = torch.as_tensor(group_ids, device=rewards.device)  # (S,)
    out = torch.empty_like(rewards)
    for group in group_ids.unique():
        members = group_ids == group  # (S,) bool
        out[members] = grpo_advantages(rewards[members][None], normalize_std, eps)[0]
    return out


def broadcast_to_tokens(per_sample: Tensor, sample_ids: Tensor) -> Tensor:
    """Give every token its sample's value: `out_t = per_sample[sample_ids_t]`, (S,) -> (N,)."""
    return per_sample[sample_ids]


def reward_shaping_kl(old_log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor,
                      kind: str) -> Tensor:
    """The `KL_t` of REINFORCE++ reward shaping, (N,).

    `KL_t = kl_penalty(old_t, ref_t, kind)` on every token, masked-out ones included (as
    in Miles, their KL enters the returns), except `KL_t = 0` where `mask_t = 0` and the
    KL is not finite (a masked-out token the engine or reference did not score): Miles
    lets it turn the returns of its whole sample into NaN. A non-finite KL on a token
    with `mask_t = 1` stays as it is: a fault that the loss should show.
    """
    kl = kl_penalty(old_log_probs, ref_log_probs, kind)
    return torch.where((mask > 0) | kl.isfinite(), kl, torch.zeros_like(kl))


def reinforce_plus_plus_token_rewards(
    scalar_rewards: Tensor, kl: Tensor, sample_ids: Tensor, mask: Tensor, kl_coef: float
) -> Tensor:
    """REINFORCE++ token rewards, (N,).

    `r_t = -kl_coef * kl_t` on every token, masked-out ones included (as in Miles), plus
    the sample's scalar reward (`scalar_rewards`, (S,)) at its last token with mask 1;
    a sample with no such token gets it at its last token (Miles refuses such a
    sample), and a sample without tokens drops it.
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


def reinforce_plus_plus_returns(token_rewards: Tensor, sample_ids: Tensor, gamma: float) -> Tensor:
    """Discounted return to the end of each sample, (N,).

    `A_t = sum_{s >= t, s in sample(t)} gamma^(s - t) * r_s` over every token of the
    sample, masked-out ones included (as in Miles: the KL of a tool-output token
    still shapes the returns before it; the loss mask drops its own term later).
    An empty batch (no response tokens) gives an empty result.
    """
    if sample_ids.numel() == 0:
        return token_rewards.clone()
    positions = _positions_in_sample(sample_ids)  # (N,)
    num_samples, max_length = int(sample_ids.max()) + 1, int(positions.max()) + 1
    # (S, T), zero-padded after each sample's end so the padding adds nothing.
    padded = token_rewards.new_zeros(num_samples, max_length)
    padded[sample_ids, positions] = token_rewards
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

    `mean` and `var` are over the K tokens with mask 1, `var` with Bessel's correction,
    `sum_m (A - mean)^2 / (K - 1)`, as Miles (K = 1 gives var 0). Masked-out tokens do
    not enter the statistics, even when not finite, but are whitened with them (as in
    Miles and verl); the loss mask discards them later. An all-zero mask (no loss token
    in the batch) leaves the values as they are, where Miles raises.
    """
    active = mask > 0
    count = active.sum()
    kept = torch.where(active, values, torch.zeros_like(values))
    mean = kept.sum() / count.clamp(min=1)
    squared = torch.where(active, (values - mean) ** 2, torch.zeros_like(values))
    var = squared.sum() / (count - 1).clamp(min=1)
    return torch.where(count > 0, (values - mean) * torch.rsqrt(var + eps), values)


def _positions_in_sample(sample_ids: Tensor) -> Tensor:
    """Index of each token within its sample, (N,): 0 at the first token of each sample."""
    index = torch.arange(sample_ids.shape[0], device=sample_ids.device)
    is_first = torch.ones_like(sample_ids, dtype=torch.bool)
    is_first[1:] = sample_ids[1:] != sample_ids[:-1]
    first_index = torch.where(is_first, index, 0).cummax(dim=0).values
    return index - first_index
