"""--advantage-estimator and its flags -> the advantages of one rollout batch.

The wiring between the flags (`GrpoArgs`) and the formulas of furlong.algo.advantages
(written out in docs/algorithm.md), as train/objective.py is for the loss; with
--use-opd the teacher's reverse KL is subtracted from each token's advantage (before
--normalize-advantages), as in Miles. Advantages are computed over the whole rollout
batch at once, before it is split into optimizer steps and micro-batches. Groups are
identified by the samples' group index: a custom generate function may return several
samples per prompt, so groups need not be equal in size.
"""
from __future__ import annotations

import torch

from furlong.algo import advantages as adv
from furlong.config.groups import GrpoArgs
from furlong.train.batch import TrainBatch


def compute_advantages(config: GrpoArgs, batch: TrainBatch, group_ids: list[int | None],
                       rewards: list[float] | None = None
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample advantage tensors (R_i,), and the per-sample normalised rewards (S,).
    `rewards` (a reward post-process hook's, as in Miles) are taken as the normalised
    rewards: no group statistics are applied to them."""
    estimator = config.advantage_estimator
    mask, sample_ids = _flat(batch.loss_masks)
    counts = [len(m) for m in batch.loss_masks]
    given = None if rewards is None else torch.tensor(rewards, dtype=torch.float32)
    if estimator == "reinforce_plus_plus":
        scalars = batch.rewards if given is None else given
        token_rewards = adv.reinforce_plus_plus_token_rewards(
            scalars, _shaping_kl(config, batch, mask), sample_ids, mask, config.kl_coef)
        tokens = adv.reinforce_plus_plus_returns(token_rewards, sample_ids, config.gamma)
    else:  # GRPO, GSPO: A = the normalised reward; REINFORCE++ baseline: A_t = that - kl_t
        scalars = _group_normalized(config, batch, group_ids) if given is None else given
        tokens = adv.broadcast_to_tokens(scalars, sample_ids)
        if estimator == "reinforce_plus_plus_baseline":
            tokens = tokens - config.kl_coef * _shaping_kl(config, batch, mask)
    if config.use_opd:  # on-policy distillation: A_t - coef * (student_t - teacher_t)
        tokens = tokens - config.opd_kl_coef * torch.cat(opd_reverse_kl(batch))
    if config.normalize_advantages:
        tokens = adv.whiten(tokens, mask)
    return list(tokens.split(counts)), scalars


def opd_reverse_kl(batch: TrainBatch) -> list[torch.Tensor]:
    """--use-opd: per sample, the student's (old) log-prob minus the teacher's of each
    response token, the sampled-token estimate of KL(student || teacher)."""
    teacher = batch.teacher_log_probs
    if batch.old_log_probs is None:
        raise ValueError("--use-opd with --use-rollout-logprobs needs the engine's log-probs "
                         "of every sample (sample.rollout_log_probs), and some have none; a "
                         "custom generate function must fill them, or leave out "
                         "--use-rollout-logprobs")
    for index, (student, values) in enumerate(zip(batch.old_log_probs, teacher, strict=True)):
        if student.shape != values.shape:
            raise ValueError(f"--use-opd: sample {index} has {len(values)} teacher log-probs "
                             f"for {len(student)} response tokens; the teacher's log-prob of "
                             "each response token is needed (sample.teacher_log_probs)")
    return [student - values.to(student.device)
            for student, values in zip(batch.old_log_probs, teacher, strict=True)]


def _group_normalized(config: GrpoArgs, batch: TrainBatch, group_ids: list[int | None]
                      ) -> torch.Tensor:
    """Each reward less its group's mean, divided by the group's std for GRPO and GSPO
    (unless --disable-grpo-std-normalization), not for the REINFORCE++ baseline; the
    rewards as they are with --disable-rewards-normalization (Miles')."""
    if config.disable_rewards_normalization:
        return batch.rewards
    std = config.advantage_estimator in ("grpo", "gspo") \
        and not config.disable_grpo_std_normalization
    return adv.grpo_advantages_by_group_id(batch.rewards, _dense_group_ids(group_ids), std)


def _shaping_kl(config: GrpoArgs, batch: TrainBatch, mask: torch.Tensor) -> torch.Tensor:
    """KL_t of REINFORCE++ reward shaping, (N,); zeros without --kl-coef."""
    if not config.kl_coef:
        return torch.zeros_like(mask)
    old, _ = _flat(batch.old_log_probs)
    ref, _ = _flat(batch.ref_log_probs)
    return adv.reward_shaping_kl(old, ref, mask, config.kl_loss_type)


def _dense_group_ids(group_ids: list[int | None]) -> torch.Tensor:
    """(S,) ids 0..G-1 for the samples' group indices. A custom rollout function may leave
    `Sample.group_index` unset: the samples without one form one group."""
    dense = {group: i for i, group in enumerate(dict.fromkeys(group_ids))}
    return torch.tensor([dense[group] for group in group_ids], dtype=torch.long)


def _flat(per_sample: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-sample token tensors; returns (values (N,), sample_ids (N,))."""
    sample_ids = torch.cat([torch.full((len(t),), i) for i, t in enumerate(per_sample)])
    return torch.cat(per_sample), sample_ids
