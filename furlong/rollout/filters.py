"""Dynamic-sampling filters: decide whether a finished group enters the batch.

Signature of --dynamic-sampling-filter-path hooks:
    fn(args, samples: list[Sample]) -> bool | FilterResult (anything with .keep, .reason)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FilterResult:
    keep: bool
    reason: str | None = None


def check_reward_nonzero_std(args, samples) -> FilterResult:
    """Keep the group only if its rewards are not all equal (equal rewards: zero advantage)."""
    rewards = torch.tensor([s.scalar_reward(args.reward_key) for s in samples])
    keep = len(samples) > 1 and bool(rewards.std() > 0)
    return FilterResult(keep, None if keep else "zero_std")


def as_filter_result(value) -> FilterResult:
    """Normalise a hook's return value; a bare False is dropped for reason 'filtered'.

    "Bare" includes a 0-dim tensor or numpy bool: slime's documented filter returns
    `torch.tensor(rewards).std() > 0.0`.
    """
    if not hasattr(value, "keep"):
        keep = bool(value)
        return FilterResult(keep, None if keep else "filtered")
    keep = bool(value.keep)
    return FilterResult(keep, None if keep else (getattr(value, "reason", None) or "filtered"))
