"""The RL step of one rollout: samples -> TrainBatch -> old and reference log-probs ->
advantages -> the trainer's optimizer steps -> metrics, named as they are logged.

Why here: the loop (furlong/loop.py) decides when a rollout trains; this module decides
what training on it means, as docs/algorithm.md describes it. It sits in train/, beside
what it drives and fills in (the `Trainer` of train/base.py, `TrainBatch`, the objective
that reads the batch), so that one package holds the whole of training. It runs in the
process that runs the loop, against the ranks of this process or a group of Ray actors
alike; the per-rank half (forward, objective, optimizer step) is train/actor.py.

Where the old log-probs come from is decided by `old_log_probs_source` and nowhere else:

    ROLLOUT             --use-rollout-logprobs: the engine's own
    GENERATING_WEIGHTS  --keep-old-actor: each sample's, under the snapshot of the
                        weights that generated it
    RECOMPUTED          a forward of the current weights before the first optimizer step:
                        the policy changes within the rollout (several steps), REINFORCE++
                        shapes rewards with KL(old, ref), on-policy distillation subtracts
                        KL(old, teacher) from the advantages, a custom loss reads them, or
                        --lora-dropout makes the training forward another function
    TRAINING_FORWARD    otherwise: with one step per rollout the policy being improved is
                        the current one, and the training forward's own log-probs
                        (detached) equal a recomputation, so that forward is skipped. The
                        batch carries none; the objective uses its forward's
                        (train/objective.py) and reports them as train/old_log_probs, which
                        become rollout/log_probs here (averaged as the loss is), and its
                        entropy_loss rollout/entropy

Routing replay (MoE): with --use-rollout-routing-replay the batch carries the engine's
routes of every sample, and every forward of the policy (old log-probs, optimizer steps)
routes by them; with --use-routing-replay the recomputed old log-prob forward records the
routes that the optimizer steps replay, so it needs that forward (not ROLLOUT or
GENERATING_WEIGHTS). The reference routes on its own either way, as in Miles.

Advantages come from train/advantage_estimator.py (the flags -> furlong.algo.advantages,
formulas in docs/algorithm.md), over the whole rollout batch.
"""
from __future__ import annotations

import enum
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from statistics import mean

import torch

from furlong.algo import losses
from furlong.config.groups import GrpoArgs, LoraArgs, RolloutArgs
from furlong.sample import Sample
from furlong.train.advantage_estimator import compute_advantages, opd_reverse_kl
from furlong.train.base import Trainer
from furlong.train.batch import TrainBatch
from furlong.train.flops import train_throughput


@contextmanager
def timed(metrics: dict, name: str):
    start = time.perf_counter()
    yield
    metrics[name] = metrics.get(name, 0.0) + time.perf_counter() - start


class OldLogProbs(enum.Enum):
    ROLLOUT = "rollout"
    GENERATING_WEIGHTS = "generating weights"
    RECOMPUTED = "recomputed"
    TRAINING_FORWARD = "training forward"


def old_log_probs_source(grpo: GrpoArgs, rollout: RolloutArgs,
                         lora_dropout: float = 0.0) -> OldLogProbs:
    """Where the old log-probs of a rollout come from (see the module docstring)."""
    if grpo.records_routes and (grpo.use_rollout_logprobs or rollout.keep_old_actor):
        raise ValueError("--use-routing-replay records the routes in the trainer's old "
                         "log-prob forward, which --use-rollout-logprobs and --keep-old-actor "
                         "leave out; drop one of them (or use --use-rollout-routing-replay)")
    if grpo.use_rollout_logprobs:
        return OldLogProbs.ROLLOUT
    if rollout.keep_old_actor:
        return OldLogProbs.GENERATING_WEIGHTS
    if rollout.num_steps_per_rollout > 1 or bool(grpo.kl_coef) or grpo.use_opd or \
            grpo.loss_type == "custom_loss" or lora_dropout > 0:
        return OldLogProbs.RECOMPUTED
    return OldLogProbs.TRAINING_FORWARD


@dataclass
class StepResult:
    metrics: dict                # the rollout's: rollout/*, train/* (mean over steps), perf/*
    optimizer_steps: list[dict]  # train/* of each optimizer step, with train/step
    batch: TrainBatch            # what the trainer trained on


class RLStep:
    """Trains `trainer` on one rollout at a time (`__call__`)."""
    grpo: GrpoArgs
    rollout: RolloutArgs
    trainer: Trainer
    old_log_probs: OldLogProbs
    lora: LoraArgs

    def __init__(self, grpo: GrpoArgs, rollout: RolloutArgs, trainer: Trainer,
                 lora: LoraArgs | None = None):
        self.grpo, self.rollout, self.trainer = grpo, rollout, trainer
        self.lora = lora or LoraArgs()
        self.old_log_probs = old_log_probs_source(grpo, rollout, self.lora.lora_dropout)

    def __call__(self, rollout_id: int, groups: list[list[Sample]],
                 post_processed: tuple[list[float], list[float]] | None = None) -> StepResult:
        """`post_processed`: a --custom-reward-post-process-path hook's (raw rewards,
        rewards), one per sample; the rewards replace the estimator's normalised ones."""
        samples = [s for group in groups for s in group]
        raw, rewards = post_processed or (None, None)
        batch = TrainBatch.from_samples(samples, self.rollout.reward_key,
                                        routed_experts=self.grpo.use_rollout_routing_replay,
                                        raw_rewards=raw)
        metrics: dict = {}
        if self.grpo.loss_type != "sft_loss":
            metrics.update(self.prepare_policy_batch(batch, samples, rewards))
        with timed(metrics, "perf/actor_train_time"):
            steps = self.trainer.train(batch)
        metrics.update({name: mean(s[name] for s in steps) for name in steps[0]})
        if "train/old_log_probs" in metrics:  # TRAINING_FORWARD: the training forward's own
            metrics["rollout/log_probs"] = metrics.pop("train/old_log_probs")
            metrics["rollout/entropy"] = metrics["train/entropy_loss"]
        rank = self.trainer.rank
        metrics.update(train_throughput(self.trainer.model_config, [len(t) for t in batch.tokens],
                                        batch.response_lengths, metrics["perf/actor_train_time"],
                                        rank.world_size, rank.device,
                                        frozen_base=self.lora.enabled))
        interval = self.grpo.ref_update_interval
        if interval and self.trainer.has_reference and (rollout_id + 1) % interval == 0:
            self.trainer.update_reference()
        return StepResult(metrics, [{**step, "train/step": rollout_id * len(steps) + index}
                                    for index, step in enumerate(steps)], batch)

    def prepare_policy_batch(self, batch: TrainBatch, samples: list[Sample],
                             rewards: list[float] | None = None) -> dict:
        """Fill old/ref log-probs and advantages into `batch`; returns their metrics.
        `rewards`: given per-sample rewards in place of the estimator's normalised ones."""
        metrics: dict = {}
        entropy = self.fill_old_log_probs(batch, [s.latest_weight_version for s in samples],
                                          metrics)
        if self.trainer.has_reference:
            with timed(metrics, "perf/ref_log_probs_time"):
                batch.ref_log_probs, _ = self.trainer.compute_log_probs(
                    replace(batch, routed_experts=None), reference=True)
        if self.grpo.use_opd:
            self.fill_teacher_log_probs(batch, samples, metrics)
        batch.advantages, normalized = compute_advantages(self.grpo, batch,
                                                          [s.group_index for s in samples],
                                                          rewards)
        metrics["rollout/rewards"] = normalized.mean().item()
        per_token = {"rollout/log_probs": batch.old_log_probs,
                     "rollout/advantages": batch.advantages,
                     "rollout/ref_log_probs": batch.ref_log_probs, "rollout/entropy": entropy,
                     "rollout/teacher_log_probs": batch.teacher_log_probs,
                     "rollout/opd_reverse_kl": opd_reverse_kl(batch)
                     if self.grpo.use_opd else None}
        mask = torch.cat(batch.loss_masks)
        for name, values in per_token.items():
            if values is not None:
                metrics[name] = losses.masked_mean(torch.cat(values), mask).item()
        return metrics

    def fill_teacher_log_probs(self, batch: TrainBatch, samples: list[Sample],
                               metrics: dict) -> None:
        """--use-opd: batch.teacher_log_probs from the trainer's teacher (--opd-type
        megatron), or checks that every sample brought them (sglang: a reward hook sets
        sample.teacher_log_probs, as Miles' on-policy distillation examples do)."""
        if self.grpo.needs_teacher:
            with timed(metrics, "perf/teacher_log_probs_time"):
                batch.teacher_log_probs = self.trainer.compute_teacher_log_probs(
                    replace(batch, routed_experts=None))
        elif batch.teacher_log_probs is None:
            missing = [(s.group_index, s.index) for s in samples if s.teacher_log_probs is None]
            raise ValueError(f"--use-opd --opd-type sglang: {len(missing)} samples (group, "
                             f"index) carry no teacher_log_probs, e.g. {missing[:4]}; a "
                             "reward hook (--custom-rm-path or "
                             "--custom-reward-post-process-path) must set "
                             "sample.teacher_log_probs, the teacher's log-prob of each "
                             "response token (or use --opd-type megatron --opd-teacher-load)")

    def fill_old_log_probs(self, batch: TrainBatch, versions: list[int | None],
                           metrics: dict) -> list[torch.Tensor] | None:
        """batch.old_log_probs from `self.old_log_probs`; the entropy where a forward ran."""
        if self.old_log_probs is OldLogProbs.ROLLOUT:
            batch.old_log_probs = batch.rollout_log_probs
        if self.old_log_probs in (OldLogProbs.ROLLOUT, OldLogProbs.TRAINING_FORWARD):
            return None
        with timed(metrics, "perf/log_probs_time"):
            if self.old_log_probs is OldLogProbs.GENERATING_WEIGHTS:
                batch.old_log_probs, entropy = log_probs_of_generating_weights(
                    self.trainer, batch, versions)
            else:
                batch.old_log_probs, entropy = self.trainer.compute_log_probs(batch)
        return entropy


def log_probs_of_generating_weights(trainer: Trainer, batch: TrainBatch,
                                    versions: list[int | None]):
    """--keep-old-actor: each sample's old log-probs under the weights that generated it
    (the trainer's snapshot of that version), grouped by version."""
    if None in versions:
        raise ValueError("--keep-old-actor needs the weight version that generated each "
                         "sample, and some have none: a custom generate function must append "
                         "the engine output's weight_version to sample.weight_versions")
    log_probs: list = [None] * len(batch)
    entropy: list = [None] * len(batch)
    for version in sorted(set(versions)):
        indices = [i for i, v in enumerate(versions) if v == version]
        values, ent = trainer.compute_log_probs(batch.select(indices), weights_version=version)
        for i, lp, en in zip(indices, values, ent, strict=True):
            log_probs[i], entropy[i] = lp, en
    return log_probs, entropy
