"""TrainActor: the policy being trained, its reference, optimizer and schedule.

One instance per trainer rank. Every rank receives the whole rollout batch and takes
its own share of each optimizer step (`microbatch.split_across_ranks`), so the split
is a pure function of the batch and needs no communication; gradients and metrics
are summed over ranks by the parallel backend.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from furlong.config.groups import Config
from furlong.train import checkpoint, microbatch
from furlong.train.batch import TrainBatch, pack, split_tokens
from furlong.train.loss import LossInputs, make_reducer, policy_objective, sft_objective
from furlong.train.optim import LRScheduler, build_optimizer
from furlong.train.policy import CausalLMPolicy, load_hf_model


@dataclass(frozen=True)
class RankInfo:
    """Where this trainer rank sits: its data-parallel coordinates and device."""
    dp_rank: int = 0
    dp_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


class TrainActor:
    policy: CausalLMPolicy
    ref_policy: CausalLMPolicy | None
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler

    def __init__(self, config: Config, rank: RankInfo, init_weights: str, total_steps: int,
                 loss_hook: Callable | None = None, hook_args=None):
        self.config = config
        self.rank = rank
        self.policy = self._build_policy(init_weights)
        self.ref_policy = None
        if config.grpo.use_kl_loss:
            self.ref_policy = self._build_policy(config.ckpt.ref_load or config.ckpt.hf_checkpoint)
            self.ref_policy.requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.policy, config.optimizer)
        self.scheduler = LRScheduler(self.optimizer, config.optimizer, total_steps)
        self.loss_hook = loss_hook
        self.hook_args = hook_args

    def _build_policy(self, path: str) -> CausalLMPolicy:
        hf_model = load_hf_model(path, torch.float32, self.rank.device, packed=True)
        if self.config.perf.recompute_granularity is not None:
            hf_model.gradient_checkpointing_enable({"use_reentrant": False})
        return CausalLMPolicy(hf_model, self.config.perf.log_probs_chunk_size)

    # ---- splitting -------------------------------------------------------------------
    def _micro_batches(self, batch: TrainBatch, indices: list[int]) -> list[list[int]]:
        """This rank's micro-batches of the samples `indices` (one optimizer step)."""
        lengths = {i: len(batch.tokens[i]) for i in indices}
        shares = microbatch.split_across_ranks(indices, lengths, self.rank.dp_size,
                                               self.config.rollout.balance_data)
        mine = shares[self.rank.dp_rank]
        perf = self.config.perf
        if not perf.use_dynamic_batch_size:
            return microbatch.fixed_micro_batches(mine, self.config.rollout.micro_batch_size)
        count = max(microbatch.min_micro_batches([lengths[i] for i in share],
                                                 perf.max_tokens_per_gpu) for share in shares)
        return microbatch.token_budget_micro_batches(mine, lengths, perf.max_tokens_per_gpu, count)

    def _autocast(self):
        if self.rank.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, policy: CausalLMPolicy, micro) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            return policy(micro, self.config.rollout.rollout_temperature)

    # ---- log-probs ---------------------------------------------------------------------
    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, reference: bool = False
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample (log-probs, entropy) of the response tokens, for every sample.

        Each rank computes its share; the shares are gathered so every rank holds all.
        """
        policy = self.ref_policy if reference else self.policy
        policy.eval()
        log_probs: list = [None] * len(batch)
        entropy: list = [None] * len(batch)
        for indices in self._micro_batches(batch, list(range(len(batch)))):
            if not indices:
                continue
            micro = pack(batch, indices, self.rank.device)
            values, ent = self._forward(policy, micro)
            for i, lp, en in zip(indices, split_tokens(values.cpu(), micro),
                                 split_tokens(ent.cpu(), micro), strict=True):
                log_probs[i], entropy[i] = lp, en
        return self._gather(log_probs), self._gather(entropy)

    def _gather(self, per_sample: list) -> list[torch.Tensor]:
        if self.rank.dp_size == 1:
            return per_sample
        gathered: list = [None] * self.rank.dp_size
        dist.all_gather_object(gathered, per_sample)
        return [next(part[i] for part in gathered if part[i] is not None)
                for i in range(len(per_sample))]

    # ---- training ----------------------------------------------------------------------
    def train(self, batch: TrainBatch) -> list[dict]:
        """num_steps_per_rollout optimizer steps over consecutive global batches."""
        step_size = self.config.rollout.global_batch_size
        return [self._train_step(batch, list(range(start, start + step_size)))
                for start in range(0, len(batch), step_size)]

    def _train_step(self, batch: TrainBatch, indices: list[int]) -> dict:
        self.policy.train()
        per_token = self.config.grpo.calculate_per_token_loss
        step_batch = batch.select(indices)
        denominator = step_batch.num_loss_tokens() if per_token else len(indices)
        totals: dict[str, torch.Tensor] = {}
        for micro_indices in self._micro_batches(batch, indices):
            if not micro_indices:
                continue
            micro = pack(batch, micro_indices, self.rank.device)
            log_probs, entropy = self._forward(self.policy, micro)
            inputs = LossInputs(log_probs, entropy, micro,
                                make_reducer(micro, per_token, max(denominator, 1)))
            loss, metrics = self._objective(inputs)
            # Backends that average gradients over ranks get the sum back via dp_size.
            (loss * self.rank.dp_size).backward()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value.float()
        grad_norm = self._optimizer_step()
        names = sorted(totals)
        summed = _all_reduce_sum(torch.stack([totals[n] for n in names]).to(self.rank.device)
                                 if names else torch.zeros(0))
        result = {f"train/{n}": v for n, v in zip(names, summed.tolist(), strict=True)}
        result.update({"train/grad_norm": grad_norm, "train/lr": self.scheduler.lr})
        self.scheduler.step()
        return result

    def _objective(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        grpo = self.config.grpo
        if grpo.loss_type == "sft_loss":
            return sft_objective(grpo, inputs)
        if grpo.loss_type == "custom_loss":
            return self.loss_hook(self.hook_args, inputs)
        return policy_objective(grpo, inputs)

    def _optimizer_step(self) -> float:
        clip = self.config.optimizer.clip_grad
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # ---- weights and state -------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        return self.ref_policy is not None

    @property
    def model_config(self):
        return self.policy.hf_model.config

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors of the current policy (for weight sync and export)."""
        for name, param in self.policy.hf_model.named_parameters():
            yield name, param.detach()

    async def push_weights(self, engine, version: int) -> None:
        """Send the current weights to the engine (in one process: a copy with a dtype cast)."""
        await engine.update_weights(self.named_weights(), version)

    def update_reference(self) -> None:
        """Copy the policy into the reference (--ref-update-interval)."""
        self.ref_policy.load_state_dict(self.policy.state_dict())

    def save(self, directory: Path, save_optimizer: bool) -> None:
        """This rank's part of a checkpoint: the HF model, optimizer + schedule, RNG."""
        self.export_hf(directory / "model")
        rank = self.rank.dp_rank
        if save_optimizer:
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()},
                       directory / f"trainer_rank{rank}.pt")
        torch.save(checkpoint.rng_state(), directory / f"rng_rank{rank}.pt")

    def restore(self, directory: Path) -> None:
        """Optimizer, schedule and RNG of a checkpoint (the weights loaded at construction)."""
        rank = self.rank.dp_rank
        state_file = directory / f"trainer_rank{rank}.pt"
        if state_file.is_file():
            state = torch.load(state_file, weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(torch.load(directory / f"rng_rank{rank}.pt",
                                            weights_only=False))

    def export_hf(self, path: str | Path) -> None:
        self.policy.hf_model.save_pretrained(path)
