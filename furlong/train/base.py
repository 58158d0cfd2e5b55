"""The trainer interface: what the loop and the RL step need from any trainer.

Two classes implement `Trainer`: `train.actor.TrainActor` (the ranks in this process: one
rank, or rank 0 of a group it joined) and `cluster.ray_trainer.RayTrainGroup` (ranks as
Ray actors: every call goes to every rank and rank 0's answer comes back). Both take the
whole rollout batch; each rank trains on its data-parallel share of it. `Engine`
(engine/base.py) is the other side of a weight push.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from furlong.engine.base import Engine
    from furlong.train.batch import TrainBatch
    from furlong.train.parallel import RankInfo


@runtime_checkable
class Trainer(Protocol):
    """The policy being trained, its reference and optimizer, on one or more ranks."""

    @property
    def rank(self) -> RankInfo:
        """Rank 0's coordinates: the world size and device type of the group."""

    @property
    def model_config(self):
        """The policy's HF config (its shapes count the FLOPs of a step)."""

    @property
    def has_reference(self) -> bool:
        """A reference model is loaded (--use-kl-loss, --kl-coef)."""

    def compute_log_probs(self, batch: TrainBatch, reference: bool = False,
                          weights_version: int | None = None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample (log-probs, entropy) of the response tokens, (R_i,) each: of the
        policy, of the reference, or of the weights pushed at `weights_version`
        (--keep-old-actor snapshots)."""

    def compute_teacher_log_probs(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Per-sample log-probs of the response tokens under the teacher (--use-opd
        --opd-type megatron), (R_i,) each."""

    def train(self, batch: TrainBatch) -> list[dict]:
        """The --num-steps-per-rollout optimizer steps on `batch` (old log-probs and
        advantages filled in); one dict of `train/*` metrics per step."""

    def update_reference(self) -> None:
        """Copy the policy into the reference (--ref-update-interval)."""

    async def push_weights(self, engine: Engine, version: int) -> None:
        """Send the current weights to `engine`, which reports `version` from then on."""

    def snapshot_weights(self, version: int) -> None:
        """Keep the weights as pushed at `version` (--keep-old-actor)."""

    def offload(self) -> None:
        """Move the optimizer state off the device (--offload-train)."""

    def reload(self) -> None:
        """Bring the optimizer state back to the device."""

    def save(self, directory: Path, save_optimizer: bool) -> None:
        """Every rank's part of a checkpoint in `directory`."""

    def restore(self, directory: Path) -> None:
        """Optimizer, schedule and RNG state of a checkpoint (weights load at build)."""

    def export_hf(self, path: str | Path) -> None:
        """An HF model directory of the current weights."""
