"""Per-token advantages of a rollout batch, from GRPO_ARGS and the functions of furlong.algo
(formulas: docs/algorithm.md).

Groups are identified by the samples' group index (a custom generate function may
return several samples per prompt, so groups need not be equal in size).
"""
from __future__ import annotations

import torch

from furlong.algo import advantages as adv
from furlong.algo import losses
from furlong.config.groups import GrpoArgs
from furlong.train.batch import TrainBatch


def group_normalized(rewards: torch.Tensor, group_ids: list[int],
                     normalize_std: bool) -> torch.Tensor:
    """(S,) rewards -> (S,) GRPO scalars: r - mean(group), / (std(group) + 1e-6) if asked;
    exactly 0 for a group of equal rewards (algo.advantages.grpo_advantages)."""
    out = torch.empty_like(rewards)
    members: dict[int, list[int]] = {}
    for i, group in enumerate(group_ids):
        members.setdefault(group, []).append(i)
    for indices in members.values():
        out[indices] = adv.grpo_advantages(rewards[indices][None], normalize_std)[0]
    return out


def _flat(per_sample: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-sample token tensors; returns (values (N,), sample_ids (N,))."""
    sample_ids = torch.cat([torch.full((len(t),), i) for i, t in enumerate(per_sample)])
    return torch.cat(per_sample), sample_ids


def shaping_kl(config: GrpoArgs, batch: TrainBatch, mask: torch.Tensor) -> torch.Tensor:
    """KL_t of REINFORCE++ reward shaping, (N,): kl_penalty(old, ref) on every token.

    Masked-out tokens keep their KL (Miles adds it to the returns), except where it is
    not finite (a masked-out token the engine or reference did not score): that counts
    0, rather than making the returns of its whole sample NaN.
    """
    if not config.kl_coef:
        return torch.zeros_like(mask)
    old, _ = _flat(batch.old_log_probs)
    ref, _ = _flat(batch.ref_log_probs)
    kl = losses.kl_penalty(old, ref, config.kl_loss_type)
    return torch.where((mask > 0) | kl.isfinite(), kl, torch.zeros_like(kl))


def compute_advantages(config: GrpoArgs, batch: TrainBatch, group_ids: list[int]
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample advantage tensors (R_i,), and the per-sample normalised rewards (S,)."""
    estimator = config.advantage_estimator
    mask, sample_ids = _flat(batch.loss_masks)
    counts = [len(m) for m in batch.loss_masks]
    if estimator in ("grpo", "gspo"):
        scalars = group_normalized(batch.rewards, group_ids,
                                   not config.disable_grpo_std_normalization)
        tokens = adv.broadcast_to_tokens(scalars, sample_ids)
    elif estimator == "reinforce_plus_plus":
        scalars = batch.rewards
        token_rewards = adv.reinforce_plus_plus_token_rewards(
            scalars, shaping_kl(config, batch, mask), sample_ids, mask, config.kl_coef)
        tokens = adv.reinforce_plus_plus_returns(token_rewards, sample_ids, config.gamma)
    else:  # reinforce_plus_plus_baseline: A_t = (r - group mean) - kl_coef * kl_t
        scalars = group_normalized(batch.rewards, group_ids, normalize_std=False)
        tokens = (adv.broadcast_to_tokens(scalars, sample_ids)
                  - config.kl_coef * shaping_kl(config, batch, mask))
    if config.normalize_advantages:
        tokens = adv.whiten(tokens, mask)
    return list(tokens.split(counts)), scalars
