"""The objective of one micro-batch, from GRPO_ARGS and the pure functions of furlong.algo
(formulas and metrics: docs/algorithm.md).

Every term is reduced with global denominators (the step's sample count, or its
loss-token count with --calculate-per-token-loss), so summing micro-batch losses and
gradients over micro-batches and ranks gives exactly the loss of the whole step,
however it was split. Metrics are reduced the same way and summed by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from furlong.algo import losses
from furlong.config.groups import GrpoArgs
from furlong.hooks import load_function
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


def policy_objective(config: GrpoArgs, inputs: LossInputs,
                     hook_args: object = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + KL loss - entropy bonus, with optional TIS and off-policy
    sequence masking. Returns (loss, metrics).

    The formulas and metrics are those of docs/algorithm.md (Miles' names and values).
    `hook_args` is the `args` a --custom-tis-function-path hook receives (the GRPO flags
    when not given).
    """
    micro, reduce = inputs.micro, inputs.reduce
    mask = micro.loss_mask
    # Zero every per-token input at masked-out tokens before any arithmetic (see
    # losses.zero_inactive): a NaN or -inf there must reach neither loss nor gradient.
    fields = {name: losses.zero_inactive(values, mask)
              for name, values in micro.token_fields.items()}
    log_probs = losses.zero_inactive(inputs.log_probs, mask)
    # A batch without old log-probs (rl_step.old_log_probs_source: TRAINING_FORWARD) uses
    # the forward's own, and reports them (and the entropy, as entropy_loss) in place of
    # a recomputation.
    old = fields.get("old_log_probs", log_probs.detach())
    metrics = {} if "old_log_probs" in fields else {"old_log_probs": reduce(old)}
    token_loss, clipped, approx_kl = losses.policy_loss(
        log_probs, old, fields["advantages"], config.eps_clip, config.eps_clip_high,
        config.eps_clip_c, sequence_level=config.advantage_estimator == "gspo",
        mask=mask, sample_ids=micro.sample_ids, num_samples=micro.num_samples)
    ess = losses.ess_ratio(-approx_kl, mask, micro.sample_ids, micro.num_samples)  # (S,)
    metrics["ess_ratio"] = reduce(ess[micro.sample_ids])
    # The trainer's log-probs of the rollout's tokens: the old ones, or with
    # --use-rollout-logprobs (old = the engine's own) the current forward's.
    trainer = log_probs.detach() if config.use_rollout_logprobs else old
    token_loss, rollout_metrics, reduce = rollout_correction(
        config, token_loss, trainer, fields.get("rollout_log_probs"), approx_kl, micro, reduce,
        config if hook_args is None else hook_args)
    metrics.update(rollout_metrics)
    if config.use_opsm:
        keep = losses.opsm_keep(log_probs, old, fields["advantages"], mask, micro.sample_ids,
                                micro.num_samples, config.opsm_delta)
        token_loss = token_loss * keep
        metrics["opsm_clipfrac"] = reduce(1 - keep)
    pg_loss = reduce(token_loss)
    entropy_loss = reduce(losses.zero_inactive(inputs.entropy, mask))
    loss = pg_loss - config.entropy_coef * entropy_loss
    metrics.update(pg_loss=pg_loss, pg_clipfrac=reduce(clipped), ppo_kl=reduce(approx_kl),
                   entropy_loss=entropy_loss)
    if config.use_kl_loss:
        ratio = (log_probs - old).exp() if config.use_unbiased_kl else None
        kl_loss = reduce(losses.kl_penalty(log_probs, fields["ref_log_probs"],
                                           config.kl_loss_type, ratio))
        loss = loss + config.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    metrics["loss"] = loss
    return loss, {name: value.detach() for name, value in metrics.items()}


Reduce = Callable[[torch.Tensor], torch.Tensor]


def rollout_correction(config: GrpoArgs, token_loss: torch.Tensor, trainer: torch.Tensor,
                       rollout: torch.Tensor | None, approx_kl: torch.Tensor,
                       micro: PackedMicroBatch, reduce: Reduce, hook_args: object
                       ) -> tuple[torch.Tensor, dict, Reduce]:
    """How far the trainer's log-probs are from the engine's, and --use-tis. All (N,).
    Returns the token loss, the metrics and the reducer of the later terms.

    train_rollout_logprob_abs_diff = mean |trainer - rollout|; train_rollout_kl = mean
    low_var_kl(rollout, trainer) (k3 estimate of KL(rollout || trainer)). With TIS the
    token loss is scaled by the clipped ratio; tis = mean raw ratio, tis_abs =
    mean |ratio - 1|, tis_clipfrac, and ois = mean exp(-approx_kl) (the policy ratio).
    With --custom-tis-function-path the hook weights the token loss instead, at the same
    point as in Miles; tokens its returned masks drop leave the numerator of every later
    term (the denominators stay), while its metrics and ois keep the batch's mask.
    """
    if rollout is None:
        if config.use_tis:
            raise ValueError("--use-tis needs the engine's log-probs of every sample "
                             "(sample.rollout_log_probs), and this batch has none")
        return token_loss, {}, reduce
    metrics = {}
    if config.use_tis and config.custom_tis_function_path:
        token_loss, kept, metrics = custom_tis(config.custom_tis_function_path, hook_args,
                                               token_loss, trainer, rollout, micro, reduce)
        metrics["ois"] = reduce((-approx_kl).exp())
        reduce = partial(reduce_kept, reduce, kept)
    elif config.use_tis:
        weights, ratio, clipped = losses.tis_weights(trainer, rollout, config.tis_clip_low,
                                                     config.tis_clip)
        token_loss = token_loss * weights
        metrics.update(tis=reduce(ratio), tis_abs=reduce((ratio - 1).abs()),
                       tis_clipfrac=reduce(clipped), ois=reduce((-approx_kl).exp()))
    metrics.update(train_rollout_logprob_abs_diff=reduce((trainer - rollout).abs()),
                   train_rollout_kl=reduce(losses.kl_penalty(rollout, trainer, "low_var_kl")))
    return token_loss, metrics, reduce


def reduce_kept(reduce: Reduce, kept: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return reduce(values * kept)


def custom_tis(path: str, hook_args: object, token_loss: torch.Tensor, trainer: torch.Tensor,
               rollout: torch.Tensor, micro: PackedMicroBatch, reduce: Reduce
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Call the hook with Miles' keywords (per-sample lists of the micro-batch's response
    tokens; no Megatron parallel state or padded lengths: None). Returns the weighted token
    loss (N,), the kept-token mask (N,) and the hook's metrics reduced."""
    hook = load_function(path, "--custom-tis-function-path")  # imported at startup already
    sizes = torch.bincount(micro.sample_ids, minlength=micro.num_samples).tolist()
    token_loss, masks, metrics = hook(
        args=hook_args, pg_loss=token_loss, train_log_probs=list(trainer.split(sizes)),
        rollout_log_probs=list(rollout.split(sizes)),
        loss_masks=list(micro.loss_mask.split(sizes)),
        total_lengths=micro.cu_seq_lens.diff().tolist(), response_lengths=sizes,
        parallel_state=None, max_seq_lens=None)
    kept = torch.cat(list(masks)).to(token_loss.dtype)
    return token_loss, kept, {name: reduce(value) for name, value in metrics.items()}


def sft_objective(config: GrpoArgs, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the response tokens."""
    mask = inputs.micro.loss_mask
    loss = inputs.reduce(losses.sft_loss(inputs.log_probs, mask))
    entropy = inputs.reduce(losses.zero_inactive(inputs.entropy, mask))
    return loss, {"loss": loss.detach(), "entropy_loss": entropy.detach()}
