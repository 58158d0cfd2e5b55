"""Dynamic-sampling filters: decide whether a finished group enters the batch.

Signature of --dynamic-sampling-filter-path hooks (Miles' DynamicFilterOutput has .keep
and .reason too):
    fn(args, samples: list[Sample]) -> bool | FilterResult (anything with .keep, .reason)
"""
from __future__ import annotations

from dataclasses import dataclass

from furlong.algo.advantages import has_zero_std
from furlong.sample import Status


@dataclass(frozen=True)
class FilterResult:
    keep: bool
    reason: str | None = None


def check_reward_nonzero_std(args, samples) -> FilterResult:
    """Keep the group only if its rewards are not all equal (equal rewards: zero advantage).

    "Equal" is `algo.advantages.zero_std_groups` (float64 std <= 1e-8, or one sample);
    a dropped group's reason is Miles' `zero_std_<first reward rounded to 0.1>`, e.g.
    `zero_std_0.0` for an all-wrong group and `zero_std_1.0` for an all-right one.
    """
    rewards = [s.scalar_reward(args.reward_key) for s in samples]
    keep = not has_zero_std(rewards)
    return FilterResult(keep, None if keep else f"zero_std_{round(rewards[0], 1)}")


def check_no_aborted(args, samples) -> FilterResult:
    """Drop the group if one of its samples was aborted (Miles' reason `group_has_aborted`).
    The manager drops a group whose generation was cut off before scoring it; this also
    drops one whose generate hook marked a sample aborted but scored it."""
    if any(s.status == Status.ABORTED for s in samples):
        return FilterResult(False, "group_has_aborted")
    return FilterResult(True)


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
