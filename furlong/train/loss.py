"""The objective of one micro-batch, from GRPO_ARGS and the pure functions of furlong.algo.

Every term is reduced with global denominators (the step's sample count, or its
loss-token count with --calculate-per-token-loss), so summing micro-batch losses and
gradients over micro-batches and ranks gives exactly the loss of the whole step,
however it was split. Metrics are reduced the same way and summed by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from furlong.algo import losses
from furlong.config.groups import GrpoArgs
from furlong.train.batch import PackedMicroBatch


@dataclass(frozen=True)
class LossInputs:
    """What a loss function sees (also the argument of a --custom-loss-function-path hook)."""
    log_probs: torch.Tensor    # (N,) current policy, response tokens, differentiable
    entropy: torch.Tensor      # (N,) differentiable
    micro: PackedMicroBatch    # token_fields: loss_masks, advantages, old/ref/rollout log-probs
    reduce: Callable[[torch.Tensor], torch.Tensor]  # (N,) -> scalar share of the step mean


def make_reducer(micro: PackedMicroBatch, per_token: bool,
                 denominator: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(values: torch.Tensor) -> torch.Tensor:
        return losses.reduce_loss(values, micro.loss_mask, micro.sample_ids, micro.num_samples,
                                  per_token=per_token, global_denominator=denominator)
    return reduce


def policy_objective(config: GrpoArgs, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + KL loss - entropy bonus, with optional TIS. Returns (loss, metrics)."""
    fields, reduce = inputs.micro.token_fields, inputs.reduce
    log_probs = inputs.log_probs
    # On-policy steps (see loop.needs_old_log_probs) use the forward's own log-probs,
    # and report them (and the entropy, as entropy_loss) in place of a recomputation.
    old = fields.get("old_log_probs", log_probs.detach())
    metrics = {} if "old_log_probs" in fields else {"old_log_probs": reduce(old)}
    token_loss, clipped, approx_kl = losses.policy_loss(
        log_probs, old, fields["advantages"], config.eps_clip, config.eps_clip_high,
        config.eps_clip_c, sequence_level=config.advantage_estimator == "gspo",
        mask=inputs.micro.loss_mask, sample_ids=inputs.micro.sample_ids,
        num_samples=inputs.micro.num_samples)
    rollout = fields.get("rollout_log_probs")
    if rollout is not None:
        measured = log_probs.detach() if config.use_rollout_logprobs else old
        metrics["train_rollout_logprob_abs_diff"] = reduce((measured - rollout).abs())
    if config.use_tis:
        weights, tis_clipped = losses.tis_weights(old, rollout, config.tis_clip_low,
                                                  config.tis_clip)
        token_loss = token_loss * weights
        metrics.update(tis=reduce(weights), tis_clipfrac=reduce(tis_clipped))
    pg_loss = reduce(token_loss)
    entropy_loss = reduce(inputs.entropy)
    loss = pg_loss - config.entropy_coef * entropy_loss
    metrics.update(pg_loss=pg_loss, pg_clipfrac=reduce(clipped), ppo_kl=reduce(approx_kl),
                   entropy_loss=entropy_loss)
    if config.use_kl_loss:
        kl_loss = reduce(losses.kl_penalty(log_probs, fields["ref_log_probs"],
                                           config.kl_loss_type))
        loss = loss + config.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    metrics["loss"] = loss
    return loss, {name: value.detach() for name, value in metrics.items()}


def sft_objective(config: GrpoArgs, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the response tokens."""
    loss = inputs.reduce(losses.sft_loss(inputs.log_probs, inputs.micro.loss_mask))
    return loss, {"loss": loss.detach(), "entropy_loss": inputs.reduce(inputs.entropy).detach()}
