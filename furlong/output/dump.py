"""--dump-details DIR: each rollout's samples and each step's training data, on disk.

The layout is the one Miles writes under the same flag, so its analysis tools and
`--load-debug-rollout-data DIR/rollout_data/{rollout_id}.pt`-style paths carry over:

    DIR/rollout_data/{rollout_id}.pt     torch.save of a dict:
        rollout_id: int
        metadata:   {"metrics": the rollout's rollout/* and perf/* metrics}
        samples:    [Sample.to_dict() of every sample, groups in order, flattened]
    DIR/train_data/{rollout_id}_{rank}.pt    torch.save of a dict:
        rollout_id: int, rank: int, cp_rank: 0, cp_size: 1
        rollout_data: what the trainer trained on, one entry per sample
            tokens (list of (L_i,) int64), response_lengths (list of int),
            loss_masks (list of (R_i,) float32), rewards ((S,) float32, after --reward-key,
            or the raw rewards of --custom-reward-post-process-path),
            rollout_log_probs (list of (R_i,) float32, or None)
        metrics: the step's rollout/*, train/* and perf/* metrics, as logged
        optimizer_steps: [train/* of each optimizer step, with train/step]

furlong's loop drives every rank from one process, so the train data is written once, as
rank 0's, holding the whole batch (Miles writes each data-parallel rank's share). Files
are read back with `furlong.checkpoint.load_state` (weights-only unpickling).
This module only writes; what goes in is the loop's decision.
"""
from __future__ import annotations

from pathlib import Path

import torch


def rollout_path(directory: str, rollout_id: int) -> Path:
    return Path(directory) / "rollout_data" / f"{rollout_id}.pt"


def train_data_path(directory: str, rollout_id: int, rank: int = 0) -> Path:
    return Path(directory) / "train_data" / f"{rollout_id}_{rank}.pt"


def write_rollout(directory: str, rollout_id: int, samples: list[dict], metrics: dict) -> Path:
    """DIR/rollout_data/{rollout_id}.pt from the samples' `to_dict()`s."""
    path = rollout_path(directory, rollout_id)
    _save(path, {"rollout_id": rollout_id, "metadata": {"metrics": dict(metrics)},
                 "samples": samples})
    return path


def write_train_data(directory: str, rollout_id: int, rollout_data: dict, metrics: dict,
                     optimizer_steps: list[dict], rank: int = 0) -> Path:
    """DIR/train_data/{rollout_id}_{rank}.pt: the step's batch and metrics."""
    path = train_data_path(directory, rollout_id, rank)
    _save(path, {"rollout_id": rollout_id, "rank": rank, "cp_rank": 0, "cp_size": 1,
                 "rollout_data": rollout_data, "metrics": dict(metrics),
                 "optimizer_steps": [dict(row) for row in optimizer_steps]})
    return path


def _save(path: Path, payload: dict) -> None:
    """Written beside and renamed, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")
    torch.save(payload, partial)
    partial.replace(path)
